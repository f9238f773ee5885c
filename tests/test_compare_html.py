"""The HTML report in a real browser: headless Debian chromium renders it (screenshot), the error curves are drawn,
and the page logs nothing to the console. Skipped when chromium is absent (.ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from torch_fixtures import make_inputs

from parity import spec
from parity.compare import compare
from parity.compare.html import COLORS, render_html, write_html
from parity.config import TINY_VARIANTS
from parity.inputs import save_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1000,1300",
]


def shoot(page, png, profile_dir) -> list[str]:
    """Screenshot `page` into `png`; return the console messages chromium logged."""
    p = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={png}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.exists(), p.stderr[-2000:]
    return [line for line in p.stderr.splitlines() if ":CONSOLE" in line]


def pixels_of(png, hex_color: str, tol: int = 40) -> int:
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).sum(-1) < tol).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=2)
    np.savez(d / "a.npz", **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    params["llm/layers/mlp/gating_einsum"][1] *= np.float32(1.01)  # (linear alone: undone by post_ffw_norm)
    np.savez(d / "b.npz", **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    inp = str(save_inputs(d / "in.npz", make_inputs(cfg)))
    c = compare(
        ckpt=str(d / "a.npz"),
        against=str(d / "b.npz"),
        inputs=inp,
        layer_by_layer=True,
        teacher_forced=True,
        isolate=False,
    )
    write_html(c, str(d / "report.html"))
    return c, d / "report.html", d


def test_page_is_self_contained_and_complete(report):
    c, path, _ = report
    page = path.read_text()
    assert page == render_html(c)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
    assert page.count("<svg") == 2 and 'class="series propagated"' in page and 'class="series teacher-forced"' in page
    assert 'class="first"' in page and c.first_divergence in page and "checkpoint.sha256" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_chromium_renders_the_curves_without_console_errors(report, tmp_path):
    _, path, _ = report
    png = tmp_path / "report.png"
    assert shoot(path, png, tmp_path / "profile") == []
    assert Image.open(png).size == (1000, 1300)
    for name in ("propagated", "teacher-forced"):  # each curve's colour is drawn (lines and markers)
        assert pixels_of(png, COLORS[name]) > 300, name
    # The console check does catch errors: a page with a failing script logs them.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    logged = shoot(bad, tmp_path / "bad.png", tmp_path / "profile2")
    assert any("undefinedFunction" in line for line in logged), logged
