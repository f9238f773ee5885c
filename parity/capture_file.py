"""The capture-file format: a safetensors file of named tensors (float32 points; a generation file also holds int32
tokens) with the run's manifest, JSON, under "parity_manifest" in its header; written whole under a temporary name or
not at all. Also the digests and library versions every manifest records.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Any

import numpy as np

from converters import safetensors_io
from converters.atomic import atomic_output
from converters.dtypes import ST_ALL_DTYPES
from converters.rawio import JSONProblem, loads_strict
from parity import monitor
from parity.errors import CheckpointError, InputsError, OutputError, ParityError, describe

LIBRARIES = ("paligemma-parity", "numpy", "ml_dtypes", "torch", "jax", "jaxlib", "flax", "transformers", "safetensors")
OUTPUT_SUFFIX = ".safetensors"


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a directory's files (sorted names and contents); cached per file version
    (converters.digest: keyed by path, size, mtime and inode)."""
    from converters import digest

    return digest.file_sha256(path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def check_output(output: str, overwrite: bool) -> str:
    """Absolute path of a safetensors output that may be written (refused before any work)."""
    output = os.path.abspath(output)
    if not output.endswith(OUTPUT_SUFFIX):
        raise OutputError(
            describe(
                output,
                expected=f"a {OUTPUT_SUFFIX} name",
                found=repr(os.path.splitext(output)[1] or "no suffix"),
                what="outputs are safetensors files (manifest in the header)",
            )
        )
    if os.path.lexists(output) and not overwrite:
        raise OutputError(describe(output, what="output exists; pass --overwrite to replace it"))
    if not os.path.isdir(os.path.dirname(output)):
        raise OutputError(describe(output, what=f"output directory {os.path.dirname(output)} does not exist"))
    return output


def write_capture(output: str, arrays: dict[str, np.ndarray], manifest: dict, overwrite: bool = False) -> None:
    """One safetensors file (the manifest in the header), written atomically; a Ctrl-C before it writes nothing."""
    monitor.check()
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in arrays.items()]
    with atomic_output(output, False, overwrite) as tmp:
        with open(tmp, "wb") as f:
            safetensors_io.write_file(
                f,
                specs,
                ([np.ascontiguousarray(v)] for v in arrays.values()),
                metadata={"format": "np", "parity_manifest": json.dumps(manifest)},
            )


# Captures hold float32 points (float64 for float64 runs); generation files also hold int32 tokens.
CAPTURE_DTYPES = {k: v for k, v in ST_ALL_DTYPES.items() if not k.startswith("F8")}


def capture_manifest(path: str, raw: str) -> dict[str, Any]:
    """The manifest of a capture file from its header text; CheckpointError (one line) if malformed."""
    try:
        manifest = loads_strict(raw)
    except JSONProblem as e:
        raise CheckpointError(describe(path, "parity_manifest", what=f"unreadable capture manifest: {e}")) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(
            describe(path, "parity_manifest", "a JSON object", type(manifest).__name__, "unreadable capture manifest")
        )
    return manifest


def read_capture(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, manifest) of a capture or generation file (tensors in the manifest's point order, then file
    order); CheckpointError (one line) for anything malformed."""
    with safetensors_io.SafetensorsReader.open(path, allowed=CAPTURE_DTYPES) as r:
        manifest = capture_manifest(path, r.metadata.get("parity_manifest", "{}"))
        keys = list(r.keys())
        listed = manifest.get("points", [])
        listed = [k for k in listed if isinstance(k, str) and k in keys] if isinstance(listed, list) else []
        order = listed + [k for k in keys if k not in listed]
        return {k: r.read(k) for k in order}, manifest


def capture_header(path: str) -> tuple[list[str], dict[str, Any]]:
    """The tensor names a capture file holds and its manifest, from its header (no tensor is read)."""
    with safetensors_io.SafetensorsReader.open(path, allowed=CAPTURE_DTYPES) as r:
        return list(r.keys()), capture_manifest(path, r.metadata.get("parity_manifest", "{}"))


def decoding_steps(path: str) -> int:
    """The number of decoding steps of a generation file (the columns of its tokens; nothing else is read)."""
    with safetensors_io.SafetensorsReader.open(path, allowed=CAPTURE_DTYPES) as r:
        return r.read("tokens").shape[1]


class Capture:
    """A capture file opened for reading one point at a time."""

    def __init__(self, path: str):
        try:
            self.reader = safetensors_io.SafetensorsReader.open(path, allowed=CAPTURE_DTYPES)  # float64 points too
        except (ParityError, OSError, ValueError) as e:
            raise InputsError(describe(path, what=f"not a capture file: {e}")) from None
        self.path = path
        raw = self.reader.metadata.get("parity_manifest")
        if raw is None:
            self.reader.close()
            raise InputsError(describe(path, "parity_manifest", "a capture manifest in the header", "none"))
        try:
            self.manifest = capture_manifest(path, raw)
        except ParityError as e:
            self.reader.close()
            raise InputsError(str(e)) from None
        self.points = set(self.reader.keys())

    def read(self, point: str) -> np.ndarray:
        return self.reader.read(point)

    def close(self) -> None:
        self.reader.close()
