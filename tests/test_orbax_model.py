"""Both implementations give identical logits from an orbax checkpoint and from the npz it came from (and from one
orbax itself wrote from the same parameters); a tree saved from the jax implementation's `nnx.state` reads back."""

import os

import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

from converters.checkpoint import load_checkpoint  # noqa: E402
from converters.convert import convert  # noqa: E402
from parity import points, spec  # noqa: E402
from parity.config import TINY_VARIANTS  # noqa: E402
from parity.conventions import PRESETS  # noqa: E402
from parity.run import impl_api  # noqa: E402
from tests.ckpt_helpers import tiny_npz  # noqa: E402,F401  (fixture)
from tests.test_orbax import nested, orbax_save  # noqa: E402
from tests.torch_fixtures import make_inputs  # noqa: E402


def logits(path, dtype, impl):
    cfg, params = load_checkpoint(path)
    api = impl_api(impl)
    model = api.build_model(cfg, PRESETS["big_vision"], dtype=dtype, params=params)
    return api.forward(model, make_inputs(cfg))[points.LOGITS]


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("name,dtype", [("tiny-pg2-gqa", "bfloat16"), ("tiny-pg1-mqa", "float32")])
def test_logits_identical_from_orbax_and_npz(tiny_npz, tmp_path, name, dtype, impl):
    if impl == "jax":
        pytest.importorskip("jax")
    src, params = tiny_npz(name, dtype)
    convert(src, tmp_path / "ob", "orbax")
    orbax_save(tmp_path / "theirs", {"params": nested(params)})
    want = logits(src, dtype, impl)
    assert np.isfinite(want).all() and want.std() > 0
    np.testing.assert_array_equal(logits(tmp_path / "ob", dtype, impl), want)
    np.testing.assert_array_equal(logits(tmp_path / "theirs", dtype, impl), want)


def test_jax_nnx_state_saved_by_orbax_reads_back(tmp_path):
    """`nnx.to_pure_dict(nnx.state(model))` of parity.jax_impl, saved by orbax, is a PaliGemma checkpoint whose
    every tensor equals the parameters the model was built from."""
    nnx = pytest.importorskip("flax.nnx")
    from parity.jax_impl import api

    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=7)
    model = api.build_model(cfg, PRESETS["big_vision"], params=params)
    orbax_save(tmp_path / "nnx", nnx.to_pure_dict(nnx.state(model.module)))
    got_cfg, got = load_checkpoint(os.path.join(tmp_path, "nnx"), cfg.name)
    assert got_cfg == cfg and set(got) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
