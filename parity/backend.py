"""The backend protocol: what an implementation of PaliGemma offers so that `parity` can run it as a side.

Three backends ship with parity: the modules `parity.torch_impl.api` (PyTorch), `parity.jax_impl.api` (JAX / Flax
NNX) and `parity.hf_side` (transformers, an outside reference). Each module is its own backend (its functions are the
protocol's methods) and ends with `BACKEND = sys.modules[__name__]` and an assertion naming the protocol it
implements. A package outside this repository adds one by naming an object (a module, an instance, or a class
taking no arguments) that satisfies `Backend` under the entry-point group `parity.backends`:

    [project.entry-points."parity.backends"]
    mybackend = "mypackage.parity_backend:BACKEND"

It is then a side everywhere (`capture --impl mybackend`, `compare --a mybackend`, `golden check --impl mybackend`),
and teacher-forced too when it also satisfies `BlockBackend` (its blocks) or `UnitBackend` (the whole graph: the
blocks and every unit between them). Names are listed without importing anything (`names()`); a backend's module
(and its framework) is imported only when it is used (`get()`).

Everything crosses the protocol as numpy: inputs are the dict of an inputs file (image float32[B, H, W, 3] in
[-1, 1]; text, mask_ar, mask_input int[B, L]), outputs are float32 arrays named by `parity.points`. The model
object is the backend's own: parity only passes it back.

This module imports neither torch nor jax: `DTYPES` and `PRECISIONS` here are the one list of each, which the CLI's
choices and the implementations' framework dtype maps are keyed by.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Protocol, runtime_checkable

import numpy as np

from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError
from parity.training import TrainOptions, TrainResult

DTYPES = ("float32", "bfloat16", "float16", "float64")  # parameter / compute dtypes, by name
PRECISIONS = ("highest", "high", "default")  # float32 matmul precision
ENTRY_POINTS = "parity.backends"
BUILTIN = {
    "torch": "parity.torch_impl.api:BACKEND",
    "jax": "parity.jax_impl.api:BACKEND",
    "transformers": "parity.hf_side:BACKEND",  # an optional outside side
}


@runtime_checkable
class Backend(Protocol):
    """One implementation of PaliGemma, numpy in, numpy out. Implemented by the modules parity.torch_impl.api,
    parity.jax_impl.api (both BlockBackends) and parity.hf_side, and by any `parity.backends` entry point."""

    name: str
    build_options: tuple[str, ...]  # extra keyword options of build_model (jax: ("mesh",)); () for none

    def resolve_device(self, device: str) -> str:
        """The canonical device string for `device` ("cpu", "cuda:0", "gpu:0"), or ConfigError saying why not."""
        ...

    def device_description(self, device: str) -> str:
        """For the manifest: the device with its hardware, e.g. "cuda:0 (NVIDIA H200)"."""
        ...

    def speed_warning(self, dtype: str, device: str) -> str | None:
        """One line when computing in `dtype` on `device` is known to be very slow (naming the alternative)."""
        ...

    def build_model(
        self,
        config: PaliGemmaConfig,
        conventions: Conventions,
        dtype: str = "float32",
        device: str = "cpu",
        params: dict[str, np.ndarray] | None = None,
        precision: str = "highest",
        **options: Any,
    ) -> Any:
        """The model in `dtype` (one of DTYPES) on `device` under `conventions`, loaded from the canonical numpy
        `params` of parity.spec (zeros, or the backend's own choice, when None); `precision` one of PRECISIONS."""
        ...

    def forward(self, model: Any, inputs: dict[str, np.ndarray], points: list[str] | None = None) -> dict[str, Any]:
        """The capture `points` (None: logits only) of one forward pass as float32 numpy arrays, in the order asked;
        a backend that has no counterpart of a point leaves it out."""
        ...

    def generate(
        self,
        model: Any,
        inputs: dict[str, np.ndarray],
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        eos_id: int = 1,
        return_logits: bool = False,
        capture: list[str] | None = None,
        compile: str | None = None,
        ignore_eos: bool = False,
        forced_tokens: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Prefill, then decode. Returns {"tokens": int32[B, N] (the model's own picks, 0 after EOS unless
        ignore_eos), "logits": float32[B, steps, V] when return_logits, each `capture` cache point float32[B, S, K, H],
        "decode_path": str}. `forced_tokens` int[B, N]: fed instead of the picks (teacher-forced decoding)."""
        ...

    def manifest(self, model: Any) -> dict[str, Any]:
        """Fields this backend adds to a run's manifest once the model is built (jax: backend, mesh, ...); {}."""
        ...

    def notes(self, model: Any) -> dict[str, Any]:
        """What the last forward noticed beyond the points (recorded as the manifest's "notes" when not empty)."""
        ...


@runtime_checkable
class BlockBackend(Backend, Protocol):
    """A backend that also runs one block on a given input: what `compare --teacher-forced` needs."""

    def vit_block(self, model: Any, i: int, x: np.ndarray) -> dict[str, np.ndarray]:
        """ViT block i on x float32[B, T, Dv] (its input: points.IMG_POS_EMBED for i = 0, else img_block_out(i-1)).
        Returns {img_block_attn(i), img_block_out(i)} as float32."""
        ...

    def llm_block(self, model: Any, i: int, x: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """LLM block i on x float32[B, S, D] (its input: points.LLM_INPUT for i = 0, else llm_block_out(i-1)), with
        the masks and positions the forward pass builds from `inputs`. Returns {llm_block_attn(i), llm_block_mlp(i),
        llm_block_out(i)} as float32."""
        ...


@runtime_checkable
class UnitBackend(BlockBackend, Protocol):
    """A BlockBackend that also runs the units between and after the blocks, so that teacher forcing covers the
    whole graph (a BlockBackend without `unit` leaves them uncovered, and the verdict names them)."""

    def unit(self, model: Any, point: str, x: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The unit whose output is capture point `point` (a key of points.graph_units: IMG_FINAL_NORM, PROJECTOR,
        LLM_INPUT, LLM_FINAL_NORM, LOGITS) on x float32, its input point's array (points.graph_units[point]), as
        the forward pass computes it: LLM_INPUT joins x (the projected image tokens) with the sqrt(D)-scaled
        embeddings of inputs["text"]; LOGITS is the head with the convention's final softcap. Returns float32."""
        ...


@runtime_checkable
class TrainBackend(BlockBackend, Protocol):
    """A backend that also runs a fine-tuning step (`parity train-step`): parity.torch_impl.api, parity.jax_impl.api."""

    def train_step(self, model: Any, inputs: dict[str, np.ndarray], options: TrainOptions) -> TrainResult:
        """`options.steps` plain-SGD steps on one batch (`inputs` with mask_loss int[B, L]) under the model's
        conventions (loss_normalization, final_softcap, train_prefix), updating the trainable leaves of `model` in
        place; frozen leaves get no gradient computed or held (parity.training defines the loss and the result)."""
        ...


@runtime_checkable
class TrainPointsBackend(Backend, Protocol):
    """A backend whose training step can be compared point by point (`compare --train-step`): torch, jax and
    transformers (parity.hf_backward)."""

    def train_points(self, model: Any, inputs: dict[str, np.ndarray], options: TrainOptions) -> dict[str, np.ndarray]:
        """Every point of points.train_points it has a counterpart of, float32 numpy, from one training step on
        `inputs` (with mask_loss) under `options`: the training forward's capture points (on the shifted inputs:
        S - 1 positions), train/loss (shape ()) and train/example_loss ([B]), the gradient at every unit input
        (points.train_units), grad/<leaf> of every trainable leaf with grad/<leaf>/layerNN of stacked ones; with
        options.steps > 1 the later steps' losses and the trainable leaves after the last step (the model's
        trainable leaves are then updated in place)."""
        ...


@runtime_checkable
class BackwardBackend(TrainPointsBackend, BlockBackend, Protocol):
    """A TrainPointsBackend that also runs each unit's VJP on another run's points: the side B of
    `compare --train-step --teacher-forced` (parity.torch_impl.api, parity.jax_impl.api)."""

    def unit_vjps(
        self, model: Any, inputs: dict[str, np.ndarray], options: TrainOptions, given: dict[str, np.ndarray]
    ) -> dict[str, dict[str, np.ndarray]]:
        """{unit of points.train_units: its forward points, its input's gradient point and the gradient points of
        its trainable parameters (layer i of a stacked leaf; a whole leaf's share from this unit otherwise)}, each
        unit run on `given`'s input to it and with `given`'s gradient of its output as the cotangent (the head with
        the loss: none), float32 numpy."""
        ...


# -- the registry -------------------------------------------------------------------------------------------------
_loaded: dict[str, Backend] = {}


def _entry_points() -> dict[str, str]:
    """name -> "module:attribute" of every installed `parity.backends` entry point (metadata only: no import)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def names() -> list[str]:
    """Every backend name: the built-in ones, then the installed entry points (sorted)."""
    return list(BUILTIN) + sorted(n for n in _entry_points() if n not in BUILTIN)


def get(name: str) -> Backend:
    """The backend registered as `name`, imported on first use (ConfigError naming the available ones)."""
    if name in _loaded:
        return _loaded[name]
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise ConfigError(f"--impl {name!r}; available: {', '.join(names())}")
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Backend):
        missing = [m for m in (*Backend.__annotations__, *_METHODS) if not hasattr(obj, m)]
        raise ConfigError(f"backend {name!r} ({target}) does not implement parity.backend.Backend: lacks {missing}")
    _loaded[name] = obj
    return obj


def training(name: str) -> bool:
    """Whether backend `name` runs a fine-tuning step (TrainBackend): what `parity train-step --impl` needs."""
    return isinstance(get(name), TrainBackend)


def train_points(name: str) -> bool:
    """Whether backend `name` compares a training step point by point (TrainPointsBackend)."""
    return isinstance(get(name), TrainPointsBackend)


def teacher_forced_backward(name: str) -> bool:
    """Whether backend `name` runs single units' VJPs (BackwardBackend): side B of `--train-step --teacher-forced`."""
    return isinstance(get(name), BackwardBackend)


def teacher_forcing(name: str) -> bool:
    """Whether backend `name` runs single blocks (BlockBackend): the side B of `compare --teacher-forced`."""
    return isinstance(get(name), BlockBackend)


_METHODS = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
