"""Regenerate docs/img/compare-report.png: the per-layer error curves of a `parity compare --html` report.

The compare is a real one on the shipped tiny checkpoint: golden/tiny-pg2-gqa.b16.npz against a copy whose layer-1
MLP gating weights are 1% larger (a planted bug), both run by the PyTorch implementation, layer by layer and
teacher-forced. Headless chromium (the browser and flags of tests/test_compare_html.py) screenshots the page; the
picture is cropped to the curves and the point table and stored as a palette PNG (< 200 KB).

    PYTHONPATH=. .venv/bin/python docs/make_figures.py          # needs chromium on PATH
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "compare-report.png"
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
EDITED = "params/llm/layers/mlp/gating_einsum"


def parity(*args: str, ok=(0,)) -> None:
    """Run the `parity` command installed beside this Python; fail on an unexpected exit status."""
    exe = Path(sys.executable).with_name("parity")
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode not in ok:
        raise SystemExit(f"parity {' '.join(args)}: exit {p.returncode}\n{p.stderr[-2000:]}")


def crop_to_content(img: Image.Image, pad: int = 12) -> Image.Image:
    """Trim the white margin below and right of the page's content."""
    a = np.asarray(img.convert("L"))
    rows, cols = np.nonzero(a < 250)
    return img.crop((0, 0, min(img.width, cols.max() + pad), min(img.height, rows.max() + pad)))


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        # float32 copy of the shipped checkpoint (values unchanged), then the planted bug in layer 1's MLP
        parity("convert", "golden/tiny-pg2-gqa.b16.npz", "--to", "npz", "--dtype", "float32", "-o", str(d / "a.npz"))
        params = dict(np.load(d / "a.npz"))
        params[EDITED][1] *= np.float32(1.01)
        np.savez(d / "b.npz", **params)
        html = d / "report.html"
        parity(
            "compare", str(d / "a.npz"), "--against", str(d / "b.npz"), "--impl", "torch",
            "--config", "tiny-pg2-gqa", "--inputs", "golden/tiny-inputs.npz",
            "--layer-by-layer", "--teacher-forced", "--html", str(html),
            ok=(1,),
        )  # fmt: skip
        png = d / "shot.png"
        subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={d / 'profile'}", f"--screenshot={png}", html.as_uri()],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if not png.exists():
            raise SystemExit("chromium wrote no screenshot")
        img = Image.open(png).convert("RGB")
    img = crop_to_content(img.crop((0, 0, KEEP[0], KEEP[1])))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KB, {img.width}x{img.height})")


KEEP = (980, 1205)  # px of the 1000x1300 window kept: the curves and the point table, not the scrollbars

if __name__ == "__main__":
    main()
