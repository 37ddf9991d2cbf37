"""Make docs/img/report.png, the README's picture: the bundled example's HTML report as headless Chromium shows it.

Runs the README's first command (with ``--report``), then opens the report with the same code the
browser test uses (:func:`onnxq.testing.browser.open_report`: console errors and charts checked),
screenshots the top of the page and shrinks it to a small palette PNG. Needs Chromium,
chromedriver and selenium (``apt-get install chromium chromium-driver``; ``pip install -e ".[test]"``)::

    python docs/img/make_screenshot.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "img" / "report.png"
#: the README's first command, writing its report (paths relative to the repository)
COMMAND = ["onnxq", "optimize", "examples/digits/model.onnx", "-p", "easyquant", "--data", "examples/digits/calib", "--eval-data",
           "examples/digits/eval", "--baseline", "ort", "--output", "out/digits.int8.onnx", "--force", "--report", "out/digits.report.html"]
#: CSS pixels of the page shown (the summary, fidelity, evaluation and per-layer chart, the first histogram), and the PNG's width
PAGE_WIDTH, PAGE_HEIGHT, PNG_WIDTH = 1100, 1900, 820


def main() -> int:
    from PIL import Image

    from onnxq.testing.browser import find_chromium, open_report

    exe = find_chromium()
    if exe is None:
        print("no Chromium: apt-get install chromium chromium-driver; pip install selenium", file=sys.stderr)
        return 1
    subprocess.run(COMMAND, cwd=REPO, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        page = open_report(REPO / "out" / "digits.report.html", Path(tmp) / "full.png", width=PAGE_WIDTH, height=PAGE_HEIGHT, executables=exe)
        if page.console_errors or page.external_requests:
            print(f"the report is not clean in Chromium: {page.console_errors or page.external_requests}", file=sys.stderr)
            return 1
        with Image.open(page.screenshot) as im:
            im = im.convert("RGB")
            im = im.resize((PNG_WIDTH, round(im.height * PNG_WIDTH / im.width)), Image.LANCZOS)
            # a 256-colour palette (maximum coverage keeps the thin threshold lines' colours): ~80 KB instead of ~330 KB as RGB
            im.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE).save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size // 1024} KB) from {len(page.charts)} charts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
