#!/usr/bin/env bash
# Renders a memorization report in headless Chromium and checks it: no console message, every
# image decoded (a probing copy logs the count of broken images), a non-blank screenshot.
#
# Usage:
#   bench/render_report.sh [REPORT_HTML] [OUT_DIR]
#     REPORT_HTML  a report.html written by the audit (default: build a small synthetic one)
#     OUT_DIR      where screenshot.png, probe.png and the probe copy go (default: a temp dir)
#   Environment: DEEPSSIM_CHROMIUM=/path/to/chromium (default: chromium on PATH);
#                WINDOW=1280,2400 (screenshot size).
#
# Needs Chromium (Debian: apt-get install -y --no-install-recommends chromium; about 30 s and
# 113 MB of downloads on a fresh Debian 12 image). Exit status 0 when the report renders
# cleanly, 1 otherwise, 2 when no Chromium is found. tests/test_report.py runs the same check.
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT="${1:-}"
OUT="${2:-$(mktemp -d)}"
mkdir -p "$OUT"
export REPORT OUT WINDOW="${WINDOW:-1280,2400}"
python - <<'PY'
import os, sys
import numpy as np
from deepssim_jax import headless, report

chromium = headless.find_chromium()
if chromium is None:
  print(f"no Chromium found (tried {headless.CHROMIUM_NAMES} and $DEEPSSIM_CHROMIUM)")
  sys.exit(2)
out = os.environ["OUT"]
page = os.environ["REPORT"]
if not page:  # a small synthetic report: 12 random pairs
  rng = np.random.default_rng(0)
  n, cfg = 12, report.default_config()
  s = rng.uniform(0.3, 1.0, n)
  lab = np.where(s <= 0.6, 0, np.where(s > 0.85, 1, 2))
  text = report.build_report(
      {"counts": {"duplicate": int((lab == 1).sum())}, "memorization_rate": float((lab == 1).mean())},
      s, lab, [f"synth-{i}" for i in range(n)], [f"train-{i}" for i in range(n)],
      rng.normal(size=(n, 136, 112)), rng.normal(size=(n, 136, 112)),
      {"t_low": 0.6, "t_high": 0.85}, cfg)
  page = report.write_report(os.path.join(out, "report.html"), text)
window = tuple(int(v) for v in os.environ["WINDOW"].split(","))
plain = headless.render_headless(page, os.path.join(out, "screenshot.png"), window, chromium)
probe = headless.render_headless(page, os.path.join(out, "probe.png"), window, chromium,
                               probe=True)
stats = headless.screenshot_stats(plain["screenshot"])
print(f"chromium: {chromium}")
print(f"report:   {page}")
print(f"render:   {plain['seconds']:.1f} s, exit {plain['returncode']}; screenshot "
      f"{plain['screenshot']} {stats}")
print(f"console (report):  {plain['console'] or 'none'}")
print(f"console (probe):   {probe['console']}")
ok = (plain["returncode"] == 0 and not plain["console"] and stats["std"] > 20
      and len(probe["console"]) == 1 and " broken=0" in probe["console"][0])
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
