"""Crafting malformed files byte by byte (zip records, npy and safetensors headers), for the hostile-input tests.

Offsets follow the ZIP application note (APPNOTE 4.3.7: local file header, 4.3.12: central directory header,
4.3.16: end of central directory record) and the safetensors / npy format descriptions; nothing here calls the code
under test.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib

import numpy as np

# Field offsets inside a central directory header (signature PK\1\2) and a local file header (PK\3\4).
CD = dict(
    extract_version=6,
    flags=8,
    method=10,
    crc=16,
    csize=20,
    usize=24,
    name_len=28,
    extra_len=30,
    comment_len=32,
    offset=42,
    name=46,
)
LH = dict(flags=6, method=8, crc=14, csize=18, usize=22, name_len=26, extra_len=28, name=30)
EOCD_CD_OFFSET = 16


def central_records(data: bytes) -> list[dict]:
    """Every central directory record: {pos, name, offset, crc, ...} read straight from the bytes."""
    out, i = [], data.find(b"PK\x01\x02")
    while i >= 0:
        n, e, c = struct.unpack_from("<HHH", data, i + CD["name_len"])
        out.append(
            dict(
                pos=i,
                name=data[i + 46 : i + 46 + n].decode("cp437"),
                offset=struct.unpack_from("<I", data, i + CD["offset"])[0],
                crc=struct.unpack_from("<I", data, i + CD["crc"])[0],
                size=struct.unpack_from("<I", data, i + CD["usize"])[0],
                end=i + 46 + n + e + c,
            )
        )
        i = data.find(b"PK\x01\x02", i + 46 + n + e + c)
    return out


def record(data: bytes, name: str) -> dict:
    return next(r for r in central_records(data) if r["name"] == name)


def put(data: bytearray, pos: int, fmt: str, value) -> None:
    struct.pack_into(fmt, data, pos, value)


def npy_bytes(header: str, payload: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """An npy member with a literal header dict text (padded to 64 bytes as numpy does)."""
    h = header + " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack("<H", len(h)) + h.encode("latin1") + payload


def raw_npz(path, members: dict[str, bytes]) -> None:
    """An uncompressed zip of raw member bytes (names as given; zipfile computes sizes and CRCs)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, b in members.items():
            z.writestr(name, b)


def st_split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def st_join(header, body: bytes, raw: bytes | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw JSON bytes when `raw` is given) and a data section."""
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def st_file(tensors: dict[str, np.ndarray], dtype_names: dict[str, str], metadata=None) -> bytes:
    """A safetensors file written by hand (offsets in the given order)."""
    header, off, body = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for k, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": dtype_names[k], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        body += b
    return st_join(header, body)


def crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def member_data(data: bytes, name: str) -> int:
    """Offset of a member's bytes (its npy header first), past the local header's name and extra field."""
    off = record(data, name)["offset"]
    n, e = struct.unpack_from("<HH", data, off + LH["name_len"])
    return off + 30 + n + e
