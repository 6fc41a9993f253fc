"""Headless Chromium rendering of an HTML page: the offline report's rendering check.

The memorization report (deepssim_jax.report) must show in a browser without fetching
anything: `render_headless` opens a page in headless Chromium and returns its console
messages and a screenshot; with `probe`, a copy of the page gets a script that logs how
many images the browser could not decode or lay out. Used by tests/test_report.py and
bench/render_report.sh; nothing here runs in an audit.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from deepssim_jax import fileio

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to a copy of the report (the report itself has no script): logs one line with
# the number of images and of images the browser could not decode or lay out.
_PROBE = """<script>
window.addEventListener("load", function () {
  var broken = 0;
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) {
      broken++;
      console.error("image not shown: " + im.alt);
    }
  }
  console.log("deepssim-probe images=" + document.images.length + " broken=" + broken);
});
</script>"""


def find_chromium() -> Optional[str]:
  """The Chromium binary: $DEEPSSIM_CHROMIUM if set, else the first of CHROMIUM_NAMES on
  PATH; None if there is none."""
  env = os.environ.get("DEEPSSIM_CHROMIUM")
  if env:
    return env if shutil.which(env) else None
  for name in CHROMIUM_NAMES:
    path = shutil.which(name)
    if path:
      return path
  return None


def render_headless(html_path: str, screenshot_path: str, window: Sequence[int] = (1280, 2400),
                    chromium: Optional[str] = None, probe: bool = False,
                    timeout_s: float = 120.0, virtual_time_ms: int = 5000) -> dict[str, Any]:
  """Renders an HTML file in headless Chromium and captures its console and a screenshot.

  Args:
    html_path: the report.
    screenshot_path: PNG written by Chromium.
    window: (width, height) of the window (the screenshot's size).
    chromium: the binary (default find_chromium()).
    probe: render a copy with _PROBE appended, whose console line counts the images that
      did not load (the copy is written beside the screenshot and left there).
    timeout_s: wall-clock limit of the browser.
    virtual_time_ms: --virtual-time-budget, so the page finishes loading first.

  Returns:
    {"returncode", "console": [console messages, one per line], "stderr", "seconds",
    "screenshot": path, "command": [...]}.
  """
  chromium = chromium or find_chromium()
  if not chromium:
    raise FileNotFoundError(f"no Chromium binary found (tried {CHROMIUM_NAMES} and "
                            "$DEEPSSIM_CHROMIUM)")
  page = os.path.abspath(html_path)
  if probe:
    text = pathlib.Path(page).read_text(encoding="utf-8")
    cut = text.rfind("</body>")
    text = text[:cut] + _PROBE + text[cut:] if cut >= 0 else text + _PROBE
    page = os.path.splitext(os.path.abspath(screenshot_path))[0] + ".probe.html"
    fileio.write_text(page, text)
  with tempfile.TemporaryDirectory(prefix="deepssim-chromium-") as profile:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={int(virtual_time_ms)}",
           f"--window-size={int(window[0])},{int(window[1])}",
           f"--screenshot={os.path.abspath(screenshot_path)}", pathlib.Path(page).as_uri()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    dt = time.perf_counter() - t0
  console = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if ":CONSOLE" in line]
  return {"returncode": proc.returncode, "console": console, "stderr": proc.stderr,
          "seconds": dt, "screenshot": screenshot_path, "command": cmd}


def screenshot_stats(path: str) -> dict[str, float]:
  """Grey-level standard deviation and share of non-white pixels of a screenshot."""
  with Image.open(path) as im:
    g = np.asarray(im.convert("L"), np.float64)
  return {"std": float(g.std()), "non_white": float(np.mean(g < 250)),
          "width": int(g.shape[1]), "height": int(g.shape[0])}
