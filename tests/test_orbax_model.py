"""The PyTorch implementation gives identical logits from an orbax checkpoint and from the npz it came from (and
from one orbax itself wrote from the same parameters)."""
import os

import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

from converters.checkpoint import load_checkpoint  # noqa: E402
from converters.convert import convert  # noqa: E402
from parity import points, spec  # noqa: E402
from parity.config import TINY_VARIANTS  # noqa: E402
from parity.conventions import PRESETS  # noqa: E402
from parity.torch_impl import api  # noqa: E402
from tests.ckpt_helpers import tiny_npz  # noqa: E402,F401  (fixture)
from tests.test_orbax import nested, orbax_save  # noqa: E402
from tests.torch_fixtures import make_inputs  # noqa: E402


def logits(path, dtype):
    cfg, params = load_checkpoint(path)
    model = api.build_model(cfg, PRESETS["big_vision"], dtype=dtype, params=params)
    return api.forward(model, make_inputs(cfg))[points.LOGITS]


@pytest.mark.parametrize("name,dtype", [("tiny-pg2-gqa", "bfloat16"), ("tiny-pg1-mqa", "float32")])
def test_torch_logits_identical_from_orbax_and_npz(tiny_npz, tmp_path, name, dtype):
    src, params = tiny_npz(name, dtype)
    convert(src, tmp_path / "ob", "orbax")
    orbax_save(tmp_path / "theirs", {"params": nested(params)})
    want = logits(src, dtype)
    assert np.isfinite(want).all() and want.std() > 0
    np.testing.assert_array_equal(logits(tmp_path / "ob", dtype), want)
    np.testing.assert_array_equal(logits(tmp_path / "theirs", dtype), want)
