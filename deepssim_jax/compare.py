"""Comparing memorization audits: one table and one bar plot of several runs' rates.

`compare_runs` reads the summary.json of several audit folders (e.g. the duplication
none / low / high generators of ldm_jax) and writes compare.csv (COMPARE_COLUMNS, one row
per run) and compare.png (grouped bars of the rates); `compare_job` first audits each
synthetic set named in config.compare.synthetic (deepssim_jax.audit), then compares them.
"""

import copy
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from deepssim_jax import audit, fileio, parallel, plots

COMPARE_COLUMNS = ("name", "n_synthetic", "memorization_rate", "share_training_copied",
                   "dar_rate", "mi_rate", "carlini_rate", "mean_nearest_score", "mean_mi")


def compare_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[list]:
  """One row per audit summary (COMPARE_COLUMNS; None where a calibration was off)."""
  rows = []
  for name, s in summaries.items():
    cal = s.get("calibration", {})
    rate = lambda c: cal[c]["memorization_rate"] if c in cal else None  # noqa: E731
    rows.append([name, s["n_synthetic"], s["memorization_rate"], s["share_training_copied"],
                 rate("dar"), rate("mi"), rate("carlini"), s["nearest_score"]["mean"],
                 cal.get("mi", {}).get("mean_mi")])
  return rows


def compare_plot_png(rows: Sequence[Sequence], dpi: int = 100) -> bytes:
  """Grouped bar plot of the rates of each run."""
  measures = [("memorization_rate", "Duplicate (paper thresholds)"),
              ("share_training_copied", "training images copied"),
              ("dar_rate", "Dar et al."), ("mi_rate", "MI > flag_z"),
              ("carlini_rate", "Carlini et al.")]
  col = {c: i for i, c in enumerate(COMPARE_COLUMNS)}
  measures = [(m, lab) for m, lab in measures if any(r[col[m]] is not None for r in rows)]
  fig = plots.figure((max(4.0, 1.6 * len(rows)) + 2.6, 3.8), dpi)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(rows))
  width = 0.8 / max(1, len(measures))
  for j, (m, lab) in enumerate(measures):
    vals = [100 * (r[col[m]] or 0.0) for r in rows]
    ax.bar(x + (j - (len(measures) - 1) / 2) * width, vals, width, label=lab)
  ax.set_xticks(x)
  ax.set_xticklabels([str(r[0]) for r in rows])
  ax.set_ylabel("% of images")
  ax.set_title("Memorization by run")
  ax.set_ylim(0, 105)
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return plots.png(fig)


def compare_runs(audits: Mapping[str, str], out_dir: str, dpi: int = 100) -> dict[str, Any]:
  """Tabulates and plots the memorization rates of several audit folders.

  Args:
    audits: {run name: audit output folder (holding summary.json)}, in display order.
    out_dir: gets compare.csv (COMPARE_COLUMNS) and compare.png, each written atomically.

  Returns:
    {"csv", "png", "rows"}.
  """
  if not audits:
    raise fileio.InputError("compare: no audits to compare")
  summaries = {}
  for name, folder in audits.items():
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
      raise fileio.InputError(f"{path}: not found (run the audit of {name!r} first)")
    with open(path, encoding="utf-8") as f:
      try:
        summaries[name] = json.load(f)
      except json.JSONDecodeError as e:
        raise fileio.InputError(f"{path}: not valid JSON ({e})") from None
    for key in ("n_synthetic", "memorization_rate", "share_training_copied", "nearest_score"):
      if key not in summaries[name]:
        raise fileio.InputError(f"{path}: not an audit summary (no {key!r})")
  rows = compare_rows(summaries)
  png = compare_plot_png(rows, dpi)
  csv_path = os.path.join(out_dir, "compare.csv")
  png_path = os.path.join(out_dir, "compare.png")
  fileio.write_csv(csv_path, COMPARE_COLUMNS,
                   ([("" if v is None else v) for v in r] for r in rows))
  fileio.write_bytes(png_path, png)
  return {"csv": csv_path, "png": png_path, "rows": rows}


def compare_job(config: ml_collections.ConfigDict, workdir: str,
                embeddings: Optional[audit.Embeddings] = None,
                images: Optional[audit.Images] = None,
                checkpoint_fingerprint: Optional[Callable[[Any, str], str]] = None,
                embedding_fingerprint: Optional[Callable[[Any, str, str], str]] = None,
                model: Optional[audit.Model] = None) -> dict[str, Any]:
  """Audits each config.data entry of config.compare.synthetic, then compares them.

  Each audit (audit.audit_job, with the same hooks) goes to
  <compare.out_dir or workdir/compare>/<name>/; compare.csv and compare.png go to that
  folder.
  """
  names = tuple(config.compare.synthetic)
  if not names:
    raise fileio.InputError("config.compare.synthetic: no synthetic sets to compare")
  out_root = config.compare.out_dir or os.path.join(workdir, "compare")
  audits = {}
  for name in names:
    c = copy.deepcopy(config)  # existing fields stay settable in a locked config
    c.audit.synthetic = name
    c.audit.name = name
    c.audit.out_dir = os.path.join(out_root, name)
    audits[name] = audit.audit_job(c, workdir, embeddings, images, checkpoint_fingerprint,
                                   embedding_fingerprint, model)["out_dir"]
  if not parallel.is_main_process():
    return {"audits": audits}
  return compare_runs(audits, out_root, int(config.compare.dpi))
