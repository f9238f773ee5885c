"""What users (and the CLI) import: build a model, score a batch, generate, run one block. Numpy in, numpy out.

Same functions and signatures as parity/torch_impl/api.py, which documents them. inputs: image float32[B, H, W, 3]
in [-1, 1]; text int32[B, L]; mask_ar int32[B, L]; optional mask_input int32[B, L] (1 on real tokens; right
padding). Every computation is jitted once per shape (graphdef static, state traced) and runs under
`matmul_precision(model.precision)`, entered per call as torch_impl's.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity import points as pts
from parity import spec
from parity.blockcheck import check_block, check_unit
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.jax_impl import mesh as meshes
from parity.jax_impl.backward import train_points, unit_vjps  # noqa: F401  (BackwardBackend; there)
from parity.jax_impl.decoder import block_mask
from parity.jax_impl.generate import generate as _generate
from parity.jax_impl.load import load_canonical, place
from parity.jax_impl.model import PaliGemma
from parity.jax_impl.precision import PRECISIONS, matmul_precision
from parity.jax_impl.train import train_step  # noqa: F401  (the TrainBackend's step; documented there)
from parity.param_blocks import ParamBlocks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
PLATFORMS = ("cpu", "gpu", "tpu")


def x64_refusal(dtype: str) -> str | None:
    """Why this process cannot compute in `dtype` (None when it can): float64 needs jax's x64 mode, a process-wide
    switch read before any array exists, so it is never flipped here; a process of its own is started with
    JAX_ENABLE_X64=1 instead (`own_process`)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        return (
            "jax float64 needs x64 mode, which is process-wide: run it in a process of its own (parity capture and "
            "compare sides do; or set JAX_ENABLE_X64=1 before jax is imported)"
        )
    return None


def own_process(dtype: str) -> dict[str, str] | None:
    """The environment of a process of its own that a run in `dtype` needs (None: this process will do)."""
    return {"JAX_ENABLE_X64": "1"} if x64_refusal(dtype) else None


def _out(v: jax.Array) -> jax.Array:
    """A point as it leaves the model: float32, or float64 when computed in float64."""
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


# -- devices -------------------------------------------------------------------------------------------------------
def _split_device(device: str) -> tuple[str, int]:
    name, _, index = device.strip().lower().partition(":")
    name = {"cuda": "gpu"}.get(name, name)
    if name not in PLATFORMS or (index and not index.isdigit()):
        raise ConfigError(f"--device {device!r}: expected cpu, gpu or tpu, optionally :N")
    return name, int(index or 0)


def _platform_devices(name: str) -> list:
    try:
        return jax.devices(name)
    except RuntimeError:
        raise ConfigError(
            f"--device {name}: jax has no {name} backend here (jax {jax.__version__}, "
            f"backends: {jax.default_backend()})"
        ) from None


def resolve_device(device: str) -> str:
    """cpu | gpu | tpu [:N] (cuda accepted for gpu) -> canonical "platform:N", or ConfigError (one line)."""
    name, i = _split_device(device)
    devices = _platform_devices(name)
    if i >= len(devices):
        raise ConfigError(f"--device {device!r}: only {len(devices)} {name} device(s) ({name}:0..{len(devices) - 1})")
    return f"{name}:{i}"


def _jax_device(device: str):
    name, i = _split_device(resolve_device(device))
    return _platform_devices(name)[i]


def device_description(device: str) -> str:
    """For the manifest, e.g. "gpu:0 (NVIDIA H200)", "cpu:0 (cpu, x86_64)"."""
    d = _jax_device(device)
    kind = d.device_kind if d.platform != "cpu" else f"cpu, {platform.processor() or platform.machine()}"
    return f"{resolve_device(device)} ({kind})"


# -- the model -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Model:
    """An NNX PaliGemma with where and how it runs. `graphdef`/`state` are its nnx.split, passed to jitted code."""

    module: PaliGemma
    dtype: str
    device: str  # canonical "platform:N"
    precision: str
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.module)

    @property
    def config(self) -> PaliGemmaConfig:
        return self.module.config

    @property
    def conventions(self) -> Conventions:
        return self.module.conventions

    @property
    def backend(self) -> str:
        return _jax_device(self.device).platform

    @property
    def device_kind(self) -> str:
        return _jax_device(self.device).device_kind

    @property
    def mesh_spec(self) -> str | None:
        return None if self.mesh is None else meshes.describe_mesh(self.mesh)

    def put(self, x: np.ndarray) -> jax.Array:
        """An input array on the model's device, or sharded along "data" on its mesh."""
        if self.mesh is not None:
            return jax.device_put(x, meshes.batch_sharding(self.mesh, x.shape))
        return jax.device_put(x, _jax_device(self.device))


def build_model(
    config: PaliGemmaConfig,
    conventions: Conventions,
    dtype: str = "float32",
    device: str = "cpu",
    params: dict[str, np.ndarray] | ParamBlocks | None = None,
    precision: str = "highest",
    mesh: str | None = None,
) -> Model:
    """A PaliGemma on `device` (or sharded over `mesh`, "data=D,model=M", on that platform's devices) in `dtype`;
    parameters loaded from canonical `params` if given (a numpy dict, or parity.param_blocks.ParamBlocks streamed from
    a checkpoint, filled in place block by block; zeros otherwise), each copied once."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if why := x64_refusal(dtype):
        raise ConfigError(why)
    device = resolve_device(device)
    grid = None
    if mesh:
        grid = meshes.make_mesh(mesh, _platform_devices(_split_device(device)[0]))
        shardings = meshes.param_shardings(config, grid)
        placement = shardings.__getitem__
    else:
        where = _jax_device(device)
        placement = lambda _key: where
    abstract = nnx.eval_shape(lambda: PaliGemma(config, conventions))
    if params is not None:
        module = load_canonical(abstract, params, dtype, placement)
    else:
        module = place(
            abstract, {e.key: jnp.zeros(e.shape, DTYPES[dtype], device=placement(e.key)) for e in spec.entries(config)}
        )
    return Model(module, dtype, device, precision, grid)


def _batch(model: Model, inputs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    inputs = validate_inputs(inputs, model.config, "inputs")
    b = {"image": np.asarray(inputs["image"], np.float32)}
    for key in ("text", "mask_ar", "mask_input"):
        if key in inputs:
            b[key] = np.asarray(inputs[key]).astype(np.int32)
    b.setdefault("mask_input", np.ones_like(b["text"]))
    return {k: model.put(v) for k, v in b.items()}


def _numpy(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in tree.items()}


# -- forward -------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, batch, points: tuple[str, ...]):
    model = nnx.merge(graphdef, state)
    _, out = model(batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"], capture=points)
    return {k: _out(v) for k, v in out.items()}


def forward(model: Model, inputs: dict[str, np.ndarray], points: list[str] | None = None) -> dict[str, np.ndarray]:
    """Capture `points` (names from parity.points; None = logits only) as float32 numpy arrays."""
    wanted = [pts.LOGITS] if points is None else list(points)
    batch = _batch(model, inputs)
    with matmul_precision(model.precision):
        out = _numpy(_forward(model.graphdef, model.state, batch, tuple(sorted(set(wanted)))))
    return {name: out[name] for name in wanted}


# -- generation ----------------------------------------------------------------------------------------------------
def generate(
    model: Model,
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
    """Decode. Returns {"tokens": int32[B, max_new] (0 after EOS unless ignore_eos), "logits": float32[B, steps, V]
    if asked, captured points (cache points: float32[B, S_cache, K, H]), "decode_path": str}.
    `compile` is accepted for signature parity with torch_impl: here prefill and decode loop are always compiled.
    forced_tokens int[B, max_new_tokens]: feed these instead of the picked tokens (teacher forcing; `tokens` are
    still the model's own picks, so a forced run shows where it would have chosen differently)."""
    capture = list(capture or ())
    known = set(pts.forward_points(model.config)) | set(pts.cache_points(model.config))
    unknown = sorted(set(capture) - known)
    if unknown:
        raise ValueError(f"capture points not produced by generation: {unknown}")
    b = _batch(model, inputs)
    forced = None
    if forced_tokens is not None:
        forced = check_forced(forced_tokens, b["text"].shape[0], max_new_tokens).astype(np.int32)
    with matmul_precision(model.precision):
        g = _generate(
            model.module,
            b["image"],
            b["text"],
            b["mask_ar"],
            b["mask_input"],
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            return_logits=return_logits,
            capture=capture,
            ignore_eos=ignore_eos,
            forced_tokens=forced,
        )
    result: dict[str, Any] = {"tokens": np.asarray(g.tokens).astype(np.int32), "decode_path": g.decode_path}
    if return_logits:
        result["logits"] = np.asarray(g.logits)
    result.update(_numpy(g.captured))
    return result


def check_forced(forced_tokens: np.ndarray, batch: int, steps: int) -> np.ndarray:
    """forced_tokens as int[B, steps] (ValueError naming expected and found shapes otherwise)."""
    forced = np.asarray(forced_tokens)
    if forced.shape != (batch, steps) or not np.issubdtype(forced.dtype, np.integer):
        raise ValueError(f"forced_tokens: expected int[{batch}, {steps}], found {forced.dtype}{list(forced.shape)}")
    return forced


# -- single blocks (teacher-forced comparison) ---------------------------------------------------------------------
def _layer(stacked: nnx.Module, i):
    """Block i of a stacked module (dynamic index: one compilation serves every layer)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _block_input(model: Model, x: np.ndarray) -> np.ndarray:
    """A block input as float32, or float64 for a float64 model (a float64 capture's points lose nothing)."""
    return np.asarray(x, np.float64 if model.dtype == "float64" else np.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _vit_block(graphdef, state, i, x):
    model = nnx.merge(graphdef, state)
    _, aux = _layer(model.img.Transformer.encoderblock, i)(x.astype(model.img.pos_embedding[...].dtype))
    return {k: _out(v) for k, v in aux.items()}


@functools.partial(jax.jit, static_argnums=(0,))
def _llm_block(graphdef, state, i, x, mask_ar, mask_input):
    model = nnx.merge(graphdef, state)
    _, _, positions, masks = model.full_masks(mask_ar, mask_input)
    x = x.astype(model.llm.final_norm.scale[...].dtype)
    mask = block_mask(masks, model.llm.local_layers()[i])
    _, aux, _ = _layer(model.llm.layers, i)(
        x, model.llm.angles(positions, x.dtype), mask, attn_softcap=model.attn_softcap
    )
    return {k: _out(v) for k, v in aux.items()}


def vit_block(model: Model, i: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """ViT block i on x float32[B, T, Dv] (its input: IMG_POS_EMBED for i = 0, else img_block_out(i - 1))."""
    check_block(i, model.config.vision.depth, x, model.config.vision.width, "ViT")
    with matmul_precision(model.precision):
        out = _numpy(_vit_block(model.graphdef, model.state, jnp.int32(i), model.put(_block_input(model, x))))
    return {name(i): out[k] for k, name in pts.IMG_BLOCK_POINTS.items()}


def llm_block(model: Model, i: int, x: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LLM block i on x float32[B, S, D] (LLM_INPUT for i = 0, else llm_block_out(i - 1)), with the masks,
    positions and local/global choice the model's forward builds from `inputs`."""
    check_block(i, model.config.text.depth, x, model.config.text.width, "LLM")
    b = _batch(model, inputs)
    with matmul_precision(model.precision):
        out = _numpy(
            _llm_block(
                model.graphdef,
                model.state,
                jnp.int32(i),
                model.put(_block_input(model, x)),
                b["mask_ar"],
                b["mask_input"],
            )
        )
    return {name(i): out[k] for k, name in pts.LLM_BLOCK_POINTS.items()}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _unit(graphdef, state, point: str, x, text):
    model = nnx.merge(graphdef, state)
    return model.unit(point, x.astype(model.llm.final_norm.scale[...].dtype), text).astype(jnp.float32)


def unit(model: Model, point: str, x: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The unit whose output is capture point `point` (a key of points.graph_units) on x float32, its input point's
    array (cast to the model dtype), with the text tokens of `inputs`. Returns the point as float32."""
    check_unit(point, model.config, x)
    b = _batch(model, inputs)
    with matmul_precision(model.precision):
        out = _unit(model.graphdef, model.state, point, model.put(np.asarray(x, np.float32)), b["text"])
    return np.asarray(jax.device_get(out))


# -- the backend: this module is a parity.backend.UnitBackend (the registry's "jax"; build_model takes `mesh`) ------
import sys  # noqa: E402

from parity import backend  # noqa: E402  (the protocol; framework-free)

name = "jax"
build_options: tuple[str, ...] = ("mesh",)
loads_blocks = True  # build_model takes parity.param_blocks.ParamBlocks as params (the pipeline streams)


def speed_warning(dtype: str, device: str) -> str | None:
    return None


def manifest(model: Model) -> dict[str, Any]:
    """Backend, device kind, mesh and the persistent compilation cache (if any)."""
    return {
        "backend": model.backend,
        "device_kind": model.device_kind,
        "mesh": model.mesh_spec,
        "compile_cache": jax.config.jax_compilation_cache_dir or None,
    }


def notes(model: Model) -> dict[str, Any]:
    return {}


BACKEND = sys.modules[__name__]  # the module itself: its functions are the protocol's methods
assert isinstance(BACKEND, backend.UnitBackend)
assert isinstance(BACKEND, backend.TrainBackend)
assert isinstance(BACKEND, backend.BackwardBackend)
assert tuple(DTYPES) == backend.DTYPES and PRECISIONS == backend.PRECISIONS  # one list of each (parity.backend)
