"""What users (and the CLI) import: build a model, score a batch, generate. Numpy in, numpy out.

inputs: image float32[B, H, W, 3] in [-1, 1]; text int32[B, L]; mask_ar int32[B, L]; optional mask_input int32[B, L]
(1 on real tokens; right padding).
"""

from __future__ import annotations

import platform
import re
import time
from typing import Any

import numpy as np
import torch

from parity import points as pts
from parity.blockcheck import check_block, check_unit
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.param_blocks import ParamBlocks
from parity.torch_impl.backward import train_points, unit_vjps  # noqa: F401  (BackwardBackend; there)
from parity.torch_impl.decoder import block_mask
from parity.torch_impl.generate import generate as _generate
from parity.torch_impl.load import load_canonical
from parity.torch_impl.model import PaliGemma
from parity.torch_impl.precision import PRECISIONS, matmul_precision
from parity.torch_impl.train import train_step  # noqa: F401  (the TrainBackend's step; documented there)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEVICES = "cpu, cuda or cuda:N"


def resolve_device(device: str) -> str:
    """The canonical torch device string ("cpu", "cuda:N") for `device`, or ConfigError saying why it cannot run."""
    name = device.strip().lower()
    if name == "cpu":
        return "cpu"
    m = re.fullmatch(r"(cuda|gpu)(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"--device {device!r}: unknown device for --impl torch (expected {DEVICES})")
    if m.group(1) == "gpu":
        suggestion = "cuda" + (f":{m.group(2)}" if m.group(2) else "")
        raise ConfigError(f"--device {device!r}: torch calls GPUs cuda; use --device {suggestion}")
    if not torch.backends.cuda.is_built():
        raise ConfigError(
            f"--device {device!r}: this torch ({torch.__version__}) is built without CUDA; "
            f"use --device cpu or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(
            f"--device {device!r}: no CUDA device is visible (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}); use --device cpu"
        )
    index = int(m.group(2) or 0)
    if index >= count:
        raise ConfigError(f"--device {device!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return f"cuda:{index}"


def device_description(device: str) -> str:
    """For the manifest: "cuda:0 (NVIDIA H200)", "cpu (x86_64)"."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def matmul_gflops(dtype: str, device: str = "cpu", n: int = 64, k: int = 256, seconds: float = 0.02) -> float:
    """Measured GFLOP/s of an [n, k] @ [k, k] matmul in `dtype` on `device` (a few ms; at least two calls)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(k, k, generator=g).to(device=device, dtype=DTYPES[dtype])
    a @ b  # warm-up
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * n * k * k * calls / (time.perf_counter() - t0) / 1e9


def speed_warning(dtype: str, device: str, threshold: float = 4.0) -> str | None:
    """One line when matmuls in `dtype` on this device are measured `threshold`x slower than float32 (bfloat16 and
    float16 on CPUs without native units run ~500x slower), naming the alternative; None otherwise."""
    device = resolve_device(device)
    if dtype == "float32" or not device.startswith("cpu"):
        return None
    slow, fast = matmul_gflops(dtype, device), matmul_gflops("float32", device)
    if fast < threshold * slow:
        return None
    return (
        f"{dtype} matmuls on this CPU run {fast / slow:.0f}x slower than float32 (measured {slow:.2g} vs "
        f"{fast:.3g} GFLOP/s); --compute-dtype float32 keeps the {dtype} parameter values and computes in "
        f"float32"
    )


def build_model(
    config: PaliGemmaConfig,
    conventions: Conventions,
    dtype: str = "float32",
    device: str = "cpu",
    params: dict[str, np.ndarray] | ParamBlocks | None = None,
    precision: str = "highest",
) -> PaliGemma:
    """A PaliGemma in eval mode on `device` in `dtype`; parameters loaded from canonical `params` if given (a numpy
    dict, or parity.param_blocks.ParamBlocks streamed from a checkpoint, copied block by block into the parameters
    allocated here; zeros otherwise). precision: float32 matmul precision, kept as `model.precision` and entered by
    every run call (forward, generate, vit_block, llm_block, unit) with `matmul_precision`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # allocate in the target dtype on the target device: no f32 detour
    try:
        with torch.device(resolve_device(device)):
            model = PaliGemma(config, conventions)
    finally:
        torch.set_default_dtype(previous)
    if params is not None:
        load_canonical(model, params)
    model.precision = precision
    return model.eval()


def _tensors(model: PaliGemma, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    inputs = validate_inputs(inputs, model.config, "inputs")
    dev = model.llm.final_norm.scale.device
    t = {"image": torch.as_tensor(np.asarray(inputs["image"], np.float32), device=dev)}
    for key in ("text", "mask_ar", "mask_input"):
        if key in inputs:
            t[key] = torch.as_tensor(np.asarray(inputs[key]).astype(np.int64), device=dev)
    t.setdefault("mask_input", torch.ones_like(t["text"]))
    return t


def _numpy(x: torch.Tensor) -> np.ndarray:
    """float32 numpy; float64 stays float64 (a float64 model's points are float64)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).cpu().numpy()


@torch.inference_mode()
def forward(model: PaliGemma, inputs: dict[str, np.ndarray], points: list[str] | None = None) -> dict[str, np.ndarray]:
    """Capture `points` (names from parity.points; None = logits only) as float32 numpy arrays."""
    wanted = [pts.LOGITS] if points is None else list(points)
    t = _tensors(model, inputs)
    with matmul_precision(model.precision):
        _, out = model(t["image"], t["text"], t["mask_ar"], t["mask_input"], capture=wanted)
    return {name: _numpy(out[name]) for name in wanted}


@torch.inference_mode()
def generate(
    model: PaliGemma,
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
    """Decode. Returns {"tokens": int32[B, max_new] (0 after EOS unless ignore_eos), "logits": float32[B, steps, V] if
    asked, captured points (cache points: float32[B, S_cache, K, H]), "decode_path": str}.
    forced_tokens int[B, max_new_tokens]: feed these instead of the picked tokens (teacher forcing; `tokens` are
    still the model's own picks, so a forced run shows where it would have chosen differently)."""
    t = _tensors(model, inputs)
    forced = None
    if forced_tokens is not None:
        forced = torch.as_tensor(
            check_forced(forced_tokens, t["text"].shape[0], max_new_tokens).astype(np.int64), device=t["text"].device
        )
    with matmul_precision(model.precision):
        g = _generate(
            model,
            t["image"],
            t["text"],
            t["mask_ar"],
            t["mask_input"],
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            return_logits=return_logits,
            capture=capture or (),
            compile=compile,
            ignore_eos=ignore_eos,
            forced_tokens=forced,
        )
    result: dict[str, Any] = {"tokens": g.tokens.cpu().numpy().astype(np.int32), "decode_path": g.decode_path}
    if return_logits:
        result["logits"] = _numpy(g.logits)
    result.update({name: _numpy(x) for name, x in g.captured.items()})
    return result


def check_forced(forced_tokens: np.ndarray, batch: int, steps: int) -> np.ndarray:
    """forced_tokens as int[B, steps] (ValueError naming expected and found shapes otherwise)."""
    forced = np.asarray(forced_tokens)
    if forced.shape != (batch, steps) or not np.issubdtype(forced.dtype, np.integer):
        raise ValueError(f"forced_tokens: expected int[{batch}, {steps}], found {forced.dtype}{list(forced.shape)}")
    return forced


# -- single blocks (teacher-forced comparison: a block of this model run on another run's input to it) ------------
def _block_input(model: PaliGemma, x: np.ndarray) -> torch.Tensor:
    p = model.llm.final_norm.scale
    wide = np.float64 if p.dtype == torch.float64 else np.float32  # a float64 model takes float64 inputs whole
    return torch.as_tensor(np.asarray(x, wide), device=p.device).to(p.dtype)


@torch.inference_mode()
def vit_block(model: PaliGemma, i: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """ViT block i on x float32[B, T, Dv] (the input of block i: IMG_POS_EMBED for i = 0, else img_block_out(i-1)),
    cast to the model dtype. Returns {img_block_attn(i), img_block_out(i)} as float32."""
    check_block(i, model.config.vision.depth, x, model.config.vision.width, "ViT")
    with matmul_precision(model.precision):
        _, aux = model.img.Transformer.encoderblock[i](_block_input(model, x))
    return {name(i): _numpy(aux[k]) for k, name in pts.IMG_BLOCK_POINTS.items()}


@torch.inference_mode()
def llm_block(model: PaliGemma, i: int, x: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LLM block i on x float32[B, S, D] (the input of block i: LLM_INPUT for i = 0, else llm_block_out(i-1)), with
    the masks, positions and local/global choice the forward pass builds from `inputs`. Returns
    {llm_block_attn(i), llm_block_mlp(i), llm_block_out(i)} as float32."""
    check_block(i, model.config.text.depth, x, model.config.text.width, "LLM")
    t = _tensors(model, inputs)
    with matmul_precision(model.precision):
        _, _, positions, masks = model.full_masks(t["mask_ar"], t["mask_input"])
        x = _block_input(model, x)
        mask = block_mask(masks, model.llm.local_layers()[i])
        _, aux, _ = model.llm.layers[i](x, model.llm.angles(positions, x.dtype), mask, attn_softcap=model.attn_softcap)
    return {name(i): _numpy(aux[k]) for k, name in pts.LLM_BLOCK_POINTS.items()}


@torch.inference_mode()
def unit(model: PaliGemma, point: str, x: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The unit whose output is capture point `point` (a key of points.graph_units: encoder norm, projector,
    image/text concatenation + embedding scale, final norm, head) on x float32, its input point's array (cast to
    the model dtype), with the text tokens of `inputs`. Returns the point as float32."""
    check_unit(point, model.config, x)
    t = _tensors(model, inputs)
    with matmul_precision(model.precision):
        return _numpy(model.unit(point, _block_input(model, x), t["text"]))


# -- the backend: this module is a parity.backend.UnitBackend (the registry's "torch") ----------------------------
import sys  # noqa: E402

from parity import backend  # noqa: E402  (the protocol; framework-free)

name = "torch"
build_options: tuple[str, ...] = ()
loads_blocks = True  # build_model takes parity.param_blocks.ParamBlocks as params (the pipeline streams)


def manifest(model: PaliGemma) -> dict[str, Any]:
    """Nothing beyond the common manifest fields."""
    return {}


def notes(model: PaliGemma) -> dict[str, Any]:
    return {}


BACKEND = sys.modules[__name__]  # the module itself: its functions are the protocol's methods
assert isinstance(BACKEND, backend.UnitBackend)
assert isinstance(BACKEND, backend.TrainBackend)
assert isinstance(BACKEND, backend.BackwardBackend)
assert tuple(DTYPES) == backend.DTYPES and PRECISIONS == backend.PRECISIONS  # one list of each (parity.backend)
