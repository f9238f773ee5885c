"""Sharding over a `jax.sharding.Mesh` with axes ("data", "model"): `--mesh data=D,model=M`.

Parameters are sharded by the axis letters of their canonical shape (parity.spec rows): the width letters D / Dv
along "data" (fsdp: each device holds a slice, gathered by XLA when used) and the head / mlp / vocabulary letters
N, K, F, Nv, Fv, V along "model" (tensor parallel). A letter whose size the mesh axis does not divide stays
replicated, as does the depth axis. Activations are sharded along "data" on their batch axis. XLA inserts the
collectives (AxisType.Auto); nothing here is hand-written communication.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parity import spec
from parity.config import PaliGemmaConfig
from parity.errors import ConfigError

AXES = ("data", "model")
LETTER_AXIS = {
    "D": "data",
    "Dv": "data",
    "N": "model",
    "K": "model",
    "F": "model",
    "Nv": "model",
    "Fv": "model",
    "V": "model",
}


def parse_mesh(text: str) -> dict[str, int]:
    """ "data=2,model=4" -> {"data": 2, "model": 4} (an omitted axis has size 1)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        if name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh {text!r}: expected data=D,model=M with positive integers (got {part!r})")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(text: str, devices: list) -> Mesh:
    """A ("data", "model") mesh over the first D*M of `devices`."""
    sizes = parse_mesh(text)
    n = sizes["data"] * sizes["model"]
    if n > len(devices):
        raise ConfigError(
            f"--mesh {text!r} needs {n} devices; {len(devices)} {devices[0].platform} device(s) available"
        )
    grid = np.array(devices[:n]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def describe_mesh(mesh: Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in AXES)


def param_spec(letters: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The partition of one canonical parameter: each mesh axis on the first letter that maps to it and whose size
    it divides; everything else replicated."""
    used, out = set(), []
    for letter, size in zip(letters, shape):
        axis = LETTER_AXIS.get(letter)
        if axis is not None and axis not in used and size % mesh.shape[axis] == 0 and mesh.shape[axis] > 1:
            used.add(axis)
            out.append(axis)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(config: PaliGemmaConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """{canonical key: NamedSharding} for every parameter of `config`."""
    letters = {row.key: row.shape for row in spec.TABLE if spec.WHEN[row.when](config)}
    return {e.key: NamedSharding(mesh, param_spec(letters[e.key], e.shape, mesh)) for e in spec.entries(config)}


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batch-major activations along "data" (replicated when the batch is not a multiple of the axis)."""
    data = mesh.shape["data"]
    lead = "data" if data > 1 and shape and shape[0] % data == 0 else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (len(shape) - 1))))
