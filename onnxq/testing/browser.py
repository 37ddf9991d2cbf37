"""Open an HTML report in a real headless Chromium: console errors, what each chart drew, a screenshot.

Used by the report's browser test (tests/test_report_html.py) and by the script that makes the
README's screenshot (docs/img/make_screenshot.py), so the picture is what the test checked.
Drives the system's Chromium through selenium and the matching chromedriver (Debian:
``apt-get install chromium chromium-driver``; ``pip install selenium``); nothing is downloaded.
``ONNXQ_CHROMIUM`` and ``ONNXQ_CHROMEDRIVER`` name other executables.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ChartInfo", "PageCheck", "find_chromium", "open_report"]

#: executable names tried on PATH, in order
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)


@dataclass
class ChartInfo:
    """One inline SVG chart as the browser laid it out."""

    section: str
    width: float
    height: float
    #: ids of the drawn series (the ``series-...`` groups that hold at least one painted path or use)
    series: list[str] = field(default_factory=list)
    #: the chart's text (titles, axis labels, legend)
    text: str = ""


@dataclass
class PageCheck:
    """What a headless Chromium saw when it opened a report."""

    title: str
    #: browser console entries of level SEVERE (errors)
    console_errors: list[str]
    charts: list[ChartInfo]
    #: requests to anything but the file itself (a self-contained report makes none)
    external_requests: list[str]
    screenshot: Path | None = None


def find_chromium() -> tuple[str, str] | None:
    """``(browser, chromedriver)`` executables, or None when either is missing (or selenium is not installed)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    browser = os.environ.get("ONNXQ_CHROMIUM") or next((p for n in BROWSERS if (p := shutil.which(n))), None)
    driver = os.environ.get("ONNXQ_CHROMEDRIVER") or next((p for n in DRIVERS if (p := shutil.which(n))), None)
    return (browser, driver) if browser and driver else None


_CHARTS_JS = """
const out = [];
for (const svg of document.querySelectorAll('section[id] figure svg')) {
  const box = svg.getBoundingClientRect();
  const series = [];
  for (const g of svg.querySelectorAll('g[id*="series-"]')) {
    const painted = [...g.querySelectorAll('path, use')].some(el => {
      const b = el.getBBox ? el.getBBox() : {width: 0, height: 0};
      return (el.getAttribute('d') || el.getAttribute('xlink:href') || el.getAttribute('href')) && (b.width > 0 || b.height > 0);
    });
    if (painted) series.push(g.id);
  }
  out.push({section: svg.closest('section').id, width: box.width, height: box.height, series: series,
            text: [...svg.querySelectorAll('text')].map(t => t.textContent).join(' | ')});
}
return out;
"""


def open_report(html: str | os.PathLike[str], screenshot: str | os.PathLike[str] | None = None, *, width: int = 1200,
                height: int | None = None, executables: tuple[str, str] | None = None) -> PageCheck:
    """Open ``html`` in headless Chromium; return its console errors and charts, and save a PNG screenshot.

    ``height`` None takes the whole page; otherwise the screenshot is that many CSS pixels from the top.
    Raises RuntimeError when no Chromium is found (call :func:`find_chromium` first to skip instead).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exe = executables or find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium with chromedriver found (apt-get install chromium chromium-driver; pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={width},900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=exe[1]), options=opts)
    try:
        url = Path(html).resolve().as_uri()
        driver.get(url)
        charts = [ChartInfo(**c) for c in driver.execute_script(_CHARTS_JS)]
        console = [e.get("message", "") for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        external = _requests(driver.get_log("performance"), url)
        shot = None
        if screenshot is not None:
            full = int(driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)"))
            driver.set_window_size(width, min(full, height) if height else full)
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(shot))
        return PageCheck(driver.title, console, charts, external, shot)
    finally:
        driver.quit()


def _requests(perf_log: list[dict[str, Any]], own: str) -> list[str]:
    """URLs the page requested other than itself (from Chrome's performance log)."""
    import json

    urls = []
    for entry in perf_log:
        try:
            msg = json.loads(entry["message"])["message"]
        except (KeyError, ValueError, TypeError):
            continue
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg.get("params", {}).get("request", {}).get("url", "")
            if url and url != own and not url.startswith("data:"):
                urls.append(url)
    return urls
