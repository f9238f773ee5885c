"""Where a checkpoint's config comes from: given, beside the file, detected or inferred from the shapes in it.

In order (converters.checkpoint.open_checkpoint): `--config` (a variant name or a JSON path); what travels with the
file (an npz's sidecar, the config.json beside safetensors, orbax custom metadata); the released or tiny variant
whose spec shapes equal the file's exactly; for `inspect` only, a best guess solved from the spec's letter shapes.
"""

from __future__ import annotations

import os
from collections import Counter

from converters.hf_config import config_from_dict, from_hf_config
from converters.rawio import read_json
from parity import spec
from parity.config import ALL_VARIANTS, GEMMA2_DEFAULTS, PaliGemmaConfig, get_config
from parity.errors import ConfigError, describe

SIDECAR_SUFFIX = ".parity.json"
LAYOUTS = {"npz": "canonical", "orbax": "canonical", "safetensors": "hf"}  # the spec layout each format stores


def sidecar_path(npz_path: str) -> str:
    """The JSON beside an npz that carries what shapes cannot tell (softcaps, query scale, window)."""
    return os.fspath(npz_path) + SIDECAR_SUFFIX


def resolve_config(config: PaliGemmaConfig | str | None) -> PaliGemmaConfig | None:
    """A config object, a variant name, the path of a HF config.json, or of a paligemma-parity sidecar."""
    if config is None or isinstance(config, PaliGemmaConfig):
        return config
    if os.path.lexists(config):
        d = read_json(config, ConfigError, "config JSON")
        try:
            if d.get("model_type") == "paligemma" or "parity_config" in d:
                return from_hf_config(d, name=os.path.basename(os.path.dirname(os.path.abspath(config))))
            return config_from_dict(d)
        except ValueError as e:
            raise ConfigError(describe(config, what=str(e))) from None
    try:
        return get_config(config)
    except KeyError as e:
        raise ConfigError(str(e.args[0]) + " (or give the path of a config.json)") from None


def config_beside(path: str, fmt: str, embedded: dict | None, embedded_name: str) -> tuple[PaliGemmaConfig | None, str]:
    """The config that travels with the checkpoint, and how it was found: `embedded` (a config dict stored in the
    checkpoint's own metadata, file `embedded_name`), else the npz sidecar, else the config.json of safetensors."""
    if embedded is not None:
        try:
            return PaliGemmaConfig.from_dict(embedded), "orbax custom metadata"
        except ValueError as e:
            raise ConfigError(describe(path, embedded_name, what=str(e))) from None
    if fmt == "npz":
        side = sidecar_path(path)
        if os.path.exists(side):
            return resolve_config(side), f"sidecar {os.path.basename(side)}"
        return None, ""
    if fmt != "safetensors":
        return None, ""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cj = os.path.join(d, "config.json")
    if os.path.exists(cj):
        return resolve_config(cj), "config.json"
    return None, ""


# -- the spec's shapes against the file's ----------------------------------------------------------------------
def expected_shapes(config: PaliGemmaConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    return spec.hf_shapes(config) if LAYOUTS[fmt] == "hf" else spec.canonical_shapes(config)


def departures(shapes: dict, config: PaliGemmaConfig, fmt: str) -> list[tuple[str, object, object, str]]:
    """(key, expected, found, what) for every way the file departs from the spec under `config`."""
    exp = expected_shapes(config, fmt)
    out = []
    for k, s in exp.items():
        if k not in shapes:
            out.append((k, s, "absent", "missing key"))
        elif tuple(shapes[k]) != tuple(s):
            out.append((k, tuple(s), tuple(shapes[k]), "wrong shape"))
    for k in shapes:
        if k not in exp:
            out.append((k, "absent", tuple(shapes[k]), "unexpected key"))
    return out


def detect_config(shapes: dict, fmt: str) -> PaliGemmaConfig | None:
    """The released (or tiny) variant whose spec shapes equal the file's exactly."""
    for cfg in ALL_VARIANTS.values():
        if not departures(shapes, cfg, fmt):
            return cfg
    return None


def solve_letters(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The axis letters read off canonical shapes through the spec: each row of spec.TABLE found in `shapes` with
    the row's rank gives each of its one-letter axes. A letter seen with several values takes the most frequent
    (ties: the first seen, in table order), so a lone odd tensor shows up as that tensor's departure."""
    votes: dict[str, Counter] = {}
    for row in spec.TABLE:
        found = shapes.get(row.key)
        if found is None or len(found) != len(row.shape):
            continue
        for letter, n in zip(row.shape, found):
            if letter.isidentifier():  # not a number, not a product
                votes.setdefault(letter, Counter())[int(n)] += 1
    return {letter: c.most_common(1)[0][0] for letter, c in votes.items()}


def _only_when(condition: str) -> set[str]:
    """Keys the spec has only under `condition` (their presence in a file says the condition holds)."""
    keys = {r.key for r in spec.TABLE if r.when == condition}
    return keys - {r.key for r in spec.TABLE if r.when != condition}


def infer_config(shapes: dict) -> PaliGemmaConfig | None:
    """Best guess from canonical (npz/orbax) shapes alone, for `inspect` of unknown files: the letters solved from
    the spec's shapes; Gemma 2 (its post-norms present) with Gemma 2 defaults for what shapes cannot tell. None if
    the shapes are too incomplete (a letter missing) or name no possible config."""
    sym = solve_letters(shapes)
    if "K" not in sym and "N" in sym:
        sym["K"] = sym["N"]  # a fused qkv_einsum (stored when K == N) has no K axis
    if any(n <= 0 for n in sym.values()):
        return None
    gemma2 = any(k in shapes for k in _only_when("gemma2"))
    try:
        return PaliGemmaConfig.from_symbols("inferred", sym, **(GEMMA2_DEFAULTS if gemma2 else {}))
    except (KeyError, ValueError):
        return None
