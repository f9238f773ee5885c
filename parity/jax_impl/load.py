"""Load canonical parameters (big_vision npz keys without `params/`, layers stacked on axis 0) into the model.

Every key and shape is checked against `parity.spec` (`spec.check_params`, shared with torch_impl) before anything
is placed. The NNX parameter paths are the canonical keys themselves, stacked depth axis included, so there is no
transform at all: `llm/layers/attn/q_einsum/w` [L, N, D, H] is the state leaf ("llm", "layers", "attn",
"q_einsum", "w"). The model is built abstractly (`nnx.eval_shape`: nothing allocated) and each numpy array is
copied once, straight to its device or shards; values arrive as blocks (parity.param_blocks: a layer, rows of one,
or a whole tensor), a tensor in several blocks filled in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from parity import param_blocks, spec
from parity.errors import CheckpointError
from parity.param_blocks import ParamBlocks

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float64": np.float64}
_ACCEPTED = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64))


def _flat(tree, prefix: str = "") -> dict[str, object]:
    """{canonical key: leaf} of a nested dict (nnx.to_pure_dict)."""
    out = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        out.update(_flat(value, key + "/") if isinstance(value, dict) else {key: value})
    return out


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def to_device(x: np.ndarray, dtype: str, placement) -> jax.Array:
    """One canonical numpy array (float32 / float16 / bfloat16) -> a jax array of `dtype` on `placement` (a device
    or a sharding). A dtype change happens on the host in the single copy numpy makes anyway."""
    x = np.asarray(x)
    if x.dtype not in _ACCEPTED:
        raise CheckpointError(f"unsupported parameter dtype {x.dtype} (expected float32, float16 or bfloat16)")
    target = np.dtype(NP_DTYPES[dtype])
    if x.dtype != target:
        x = x.astype(target)
    return jax.device_put(x, placement)


def place(model: nnx.Module, arrays: dict[str, jax.Array]) -> nnx.Module:
    """A copy of `model` (typically abstract, from nnx.eval_shape) whose parameters are `arrays` {canonical key:
    jax array}, which must cover the model exactly."""
    graphdef, state = nnx.split(model)
    leaves = set(_flat(nnx.to_pure_dict(state)))
    if leaves != set(arrays):  # a model/spec disagreement, not a user error
        raise AssertionError(
            f"model parameters vs spec: only in model {sorted(leaves - set(arrays))}, "
            f"only in spec {sorted(set(arrays) - leaves)}"
        )
    nnx.replace_by_pure_dict(state, _nest(arrays))
    return nnx.merge(graphdef, state)


def load_canonical(
    model: nnx.Module,
    params: dict[str, np.ndarray] | ParamBlocks,
    dtype: str = "float32",
    placement: Callable[[str], object] | None = None,
    source: str = "params",
) -> nnx.Module:
    """A copy of `model` holding `params` (a numpy dict, or ParamBlocks streamed from a checkpoint), each cast to
    `dtype` and placed by `placement(key)` (a device or a sharding; default: jax's default device). Checks every key
    and shape before placing anything. A tensor that arrives in blocks goes into a zero array allocated where it
    belongs, block by block, each update donating the array (in place: no second copy of the model)."""
    blocks = param_blocks.of(params, source)
    spec.check_params(model.config, blocks.shape_view(), blocks.source)
    default = jax.devices()[0]
    coverage = param_blocks.Coverage(blocks.shapes)
    arrays: dict[str, jax.Array] = {}
    for key, index, rows, x in blocks.blocks:
        coverage.add(key, index, rows, x)
        where = placement(key) if placement else default
        shape = blocks.shapes[key]
        if param_blocks.is_whole(shape, index, rows):
            arrays[key] = to_device(x, dtype, where)
            continue
        if key not in arrays:
            arrays[key] = jnp.zeros(shape, NP_DTYPES[dtype], device=where)
        starts = index + ((rows[0],) if rows else ()) + (0,) * (len(shape) - len(index) - (1 if rows else 0))
        piece = to_device(np.reshape(x, (1,) * len(index) + np.shape(x)), dtype, where)
        arrays[key] = _update(where)(arrays[key], piece, tuple(np.int32(i) for i in starts))
        del piece
    coverage.check()
    return place(model, arrays)


@functools.cache
def _update(where) -> Callable:
    """`dynamic_update_slice` jitted with the target donated, so the update is done in place (where the platform
    honours donation; CPU does), its result kept at `where`'s sharding."""
    shardings = {"out_shardings": where} if isinstance(where, jax.sharding.Sharding) else {}
    return jax.jit(lambda a, b, starts: jax.lax.dynamic_update_slice(a, b, starts), donate_argnums=0, **shardings)


def state_to_canonical(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 numpy arrays (stacked layers, as stored)."""
    return {
        k: np.asarray(jax.device_get(v)).astype(np.float32)
        for k, v in _flat(nnx.to_pure_dict(nnx.state(model))).items()
    }
