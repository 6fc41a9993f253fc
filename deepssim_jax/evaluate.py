"""Three-class evaluation of similarity scores: Different / Duplicate / Similar.

The paper judges a score (DeepSSIM cosine, SSIM, a baseline's similarity) by thresholding
it into three classes and comparing with human labels of (real_key, synth_key) pairs:
score <= t_low -> 0 Different, score > t_high -> 1 Duplicate, otherwise 2 Similar
(PAPER_THRESHOLDS: 0.60 and 0.85 for DeepSSIM and SSIM). Metrics follow the reference's
eval scripts, i.e. scikit-learn's classification_report(zero_division=0): per-class
precision and recall, macro and weighted F1 over the labels present in the truth or the
predictions, and the silhouette score of the 1-D scores against the true labels; plus
accuracy, the confusion matrix and the duplicate-vs-rest TPR at 5% FPR (the reference's
later script).

This module is the one home of that rule: its thresholds (PAPER_THRESHOLDS, the default of
eval.thresholds, audit.thresholds and deepssim_jax.classify) and its class names
(CLASS_NAMES, lower case as they appear in results.json, summary.json and audit.csv;
`name.capitalize()` where they are shown to a person).

`fit_thresholds` picks (t_low, t_high) maximising macro F1 on a validation split by an
exhaustive search over candidate pairs, in O(G^2) from prefix counts of the sorted scores.
"""

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from sklearn import metrics as skm

from deepssim_jax import fileio, plots

# The paper's (t_low, t_high): score <= t_low Different, > t_high Duplicate, else Similar.
PAPER_THRESHOLDS = (0.60, 0.85)
LABELS = (0, 1, 2)
CLASS_NAMES = {0: "different", 1: "duplicate", 2: "similar"}  # display: name.capitalize()
_LABELS_TEXT = ", ".join(f"{c} ({CLASS_NAMES[c].capitalize()})" for c in LABELS)
# Exact sklearn silhouette costs O(n^2); above this many samples the exact O(n log n) 1-D
# formula is used instead (the two agree to rounding; tests check it).
SILHOUETTE_SKLEARN_MAX = 10_000
_INT_RE = re.compile(r"^[+-]?\d+$")
RATER_COLUMNS = ("r1_label", "r2_label", "r3_label")


def classify(scores: np.ndarray, t_low: float = PAPER_THRESHOLDS[0],
             t_high: float = PAPER_THRESHOLDS[1]) -> np.ndarray:
  """Scores -> labels: <= t_low 0 (Different), > t_high 1 (Duplicate), else 2 (Similar).

  Args:
    scores: (n,) similarity scores.
    t_low, t_high: thresholds, t_low <= t_high.

  Returns:
    (n,) int64 labels.
  """
  if not t_low <= t_high:
    raise ValueError(f"need t_low <= t_high, got {t_low} > {t_high}")
  s = np.asarray(scores, np.float64)
  return np.where(s <= t_low, 0, np.where(s > t_high, 1, 2)).astype(np.int64)


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray(labels)
  s = np.asarray(scores, np.float64).reshape(-1)
  if y.ndim != 1 or len(y) != len(s):
    raise ValueError(f"need as many labels as scores, got {y.shape} and {s.shape}")
  if not len(y):
    raise ValueError("no labelled pairs to evaluate")
  if not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.asarray(y, np.float64) == np.round(np.asarray(y, np.float64))):
      raise ValueError("labels must be integers 0, 1, 2")
    y = y.astype(np.int64)
  bad = ~np.isin(y, LABELS)
  if bad.any():
    raise ValueError(f"label {y[bad][0]} at position {int(np.flatnonzero(bad)[0])} is not "
                     f"one of {_LABELS_TEXT}")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"score at position {int(np.flatnonzero(~np.isfinite(s))[0])} is not "
                     "finite")
  return y.astype(np.int64), s


def silhouette_1d(scores: np.ndarray, labels: np.ndarray) -> float:
  """Exact silhouette of 1-D points with |x - y| distances, in O(n log n).

  Same definition as sklearn.metrics.silhouette_score (a: mean distance to the other
  members of the own cluster, b: smallest mean distance to another cluster, 0 for
  singleton clusters), using sorted values and prefix sums instead of the n x n distances.
  """
  x = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(labels)
  classes = np.unique(y)
  if not 2 <= len(classes) <= len(x) - 1:
    raise ValueError(f"silhouette needs 2 <= clusters ({len(classes)}) <= samples - 1")
  # sum_j |x - c_j| for each x and every cluster c.
  dist_sum = np.empty((len(classes), len(x)))
  sizes = np.empty(len(classes))
  for ci, c in enumerate(classes):
    v = np.sort(x[y == c])
    pre = np.concatenate([[0.0], np.cumsum(v)])
    n_le = np.searchsorted(v, x, side="right")
    dist_sum[ci] = x * n_le - pre[n_le] + (pre[-1] - pre[n_le]) - x * (len(v) - n_le)
    sizes[ci] = len(v)
  own = np.searchsorted(classes, y)
  own_size = sizes[own]
  a = dist_sum[own, np.arange(len(x))] / np.maximum(own_size - 1, 1)
  mean_other = dist_sum / sizes[:, None]
  mean_other[own, np.arange(len(x))] = np.inf
  b = mean_other.min(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    s = (b - a) / np.maximum(a, b)
  s = np.where(own_size > 1, np.nan_to_num(s), 0.0)
  return float(np.mean(s))


def silhouette(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
  """Silhouette of the 1-D scores against the labels; None when it is undefined.

  scikit-learn's silhouette_score (scores reshaped (-1, 1)) up to SILHOUETTE_SKLEARN_MAX
  samples, the equal exact 1-D formula above it. Undefined (None) with a single class or
  with as many classes as samples.
  """
  x = np.asarray(scores, np.float64).reshape(-1)
  n_classes = len(np.unique(labels))
  if not 2 <= n_classes <= len(x) - 1:
    return None
  if len(x) <= SILHOUETTE_SKLEARN_MAX:
    return float(skm.silhouette_score(x.reshape(-1, 1), labels))
  return silhouette_1d(x, labels)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_max: float = 0.05) -> Optional[float]:
  """Duplicate-vs-rest true-positive rate at false-positive rate <= fpr_max (ROC curve).

  None when the labels hold only duplicates or no duplicate.
  """
  positive = np.asarray(labels) == 1
  if positive.all() or not positive.any():
    return None
  fpr, tpr, _ = skm.roc_curve(positive.astype(int), np.asarray(scores, np.float64))
  ok = np.flatnonzero(fpr <= fpr_max)
  return float(tpr[ok[-1]]) if len(ok) else 0.0


def evaluate_scores(labels: Sequence[int], scores: Sequence[float],
                    t_low: float = PAPER_THRESHOLDS[0],
                    t_high: float = PAPER_THRESHOLDS[1]) -> dict[str, Any]:
  """Three-class metrics of thresholded scores against true labels.

  Args:
    labels: (n,) true labels in {0, 1, 2}.
    scores: (n,) similarity scores.
    t_low, t_high: the decision thresholds (see classify).

  Returns:
    A JSON-ready dict: n, t_low, t_high, accuracy, macro_f1, weighted_f1 (scikit-learn,
    zero_division=0, over the labels present in truth or predictions), per_class
    {name: {label, precision, recall, f1, support}} for all three classes, confusion
    (3 x 3, rows true 0/1/2, columns predicted 0/1/2), counts_true, counts_pred,
    silhouette (None if undefined), tpr_at_5fpr (None if undefined).
  """
  y, s = _check(labels, scores)
  pred = classify(s, t_low, t_high)
  p, r, f, sup = skm.precision_recall_fscore_support(y, pred, labels=list(LABELS),
                                                     zero_division=0)
  per_class = {CLASS_NAMES[c]: {"label": c, "precision": float(p[i]), "recall": float(r[i]),
                                "f1": float(f[i]), "support": int(sup[i])}
               for i, c in enumerate(LABELS)}
  return {
      "n": int(len(y)),
      "t_low": float(t_low),
      "t_high": float(t_high),
      "accuracy": float(skm.accuracy_score(y, pred)),
      "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
      "weighted_f1": float(skm.f1_score(y, pred, average="weighted", zero_division=0)),
      "per_class": per_class,
      "confusion": skm.confusion_matrix(y, pred, labels=list(LABELS)).tolist(),
      "counts_true": {CLASS_NAMES[c]: int(np.sum(y == c)) for c in LABELS},
      "counts_pred": {CLASS_NAMES[c]: int(np.sum(pred == c)) for c in LABELS},
      "silhouette": silhouette(s, y),
      "tpr_at_5fpr": tpr_at_fpr(y, s, 0.05),
  }


def default_grid(scores: np.ndarray, max_candidates: int = 1024) -> np.ndarray:
  """Candidate thresholds: midpoints of consecutive distinct scores plus both ends.

  Every distinct classification reachable by a threshold is reachable by one of them.
  With more than max_candidates distinct midpoints, evenly spaced quantiles of them.
  """
  u = np.unique(np.asarray(scores, np.float64))
  mids = (u[1:] + u[:-1]) / 2
  if len(mids) > max_candidates - 2:
    pick = np.unique(np.round(np.linspace(0, len(mids) - 1, max_candidates - 2)).astype(int))
    mids = mids[pick]
  return np.concatenate([[u[0] - 1.0], mids, [u[-1] + 1.0]])


def fit_thresholds(labels: Sequence[int], scores: Sequence[float],
                   grid: Optional[Sequence[float]] = None,
                   max_candidates: int = 1024) -> dict[str, float]:
  """Exhaustive search of (t_low <= t_high) maximising macro F1 (evaluate_scores' macro F1).

  Args:
    labels: (n,) true labels of a validation split.
    scores: (n,) their scores.
    grid: candidate thresholds (both t_low and t_high are drawn from it); default
      default_grid(scores, max_candidates).
    max_candidates: size cap of the default grid.

  Returns:
    {"t_low", "t_high", "macro_f1", "n_candidates"}; among equal macro F1, the smallest
    t_low, then the smallest t_high.
  """
  y, s = _check(labels, scores)
  g = default_grid(s, max_candidates) if grid is None else np.asarray(grid, np.float64)
  g = np.unique(g)
  if not len(g) or not np.all(np.isfinite(g)):
    raise ValueError("threshold grid must be a non-empty set of finite numbers")
  order = np.argsort(s, kind="stable")
  s_sorted, y_sorted = s[order], y[order]
  n = len(s)
  pos = np.searchsorted(s_sorted, g, side="right")  # samples with score <= t
  # cum[c, m]: samples of true class c among the m lowest scores.
  cum = np.stack([np.concatenate([[0], np.cumsum(y_sorted == c)]) for c in LABELS])
  true_tot = cum[:, -1].astype(np.float64)
  shape = (len(g), len(g))
  a = np.broadcast_to(pos[:, None], shape)  # t_low index along rows
  b = np.broadcast_to(pos[None, :], shape)  # t_high index along columns
  # predicted 0: sorted samples [0, a); predicted 2: [a, b); predicted 1: [b, n).
  tp = {0: cum[0][a], 2: cum[2][b] - cum[2][a], 1: cum[1][n] - cum[1][b]}
  pred_tot = {0: a, 2: b - a, 1: n - b}
  f1_sum = np.zeros(shape)
  present = np.zeros(shape)
  for c in LABELS:
    denom = pred_tot[c] + true_tot[c]
    f1_sum += np.where(denom > 0, 2.0 * tp[c] / np.maximum(denom, 1), 0.0)
    present += denom > 0
  macro = f1_sum / present
  macro[np.tril_indices(len(g), -1)] = -1.0  # t_low must not exceed t_high
  best = int(np.argmax(macro))  # row-major: smallest t_low, then smallest t_high
  i, j = divmod(best, len(g))
  return {"t_low": float(g[i]), "t_high": float(g[j]), "macro_f1": float(macro[i, j]),
          "n_candidates": int(len(g))}


def plot_histogram(path: str, scores: Sequence[float], labels: Sequence[int],
                   t_low: float, t_high: float, title: str = "", bins: int = 50) -> str:
  """Writes a PNG histogram of scores per true class with the two threshold lines.

  The file is written atomically (deepssim_jax.plots).

  Returns:
    path.
  """
  y, s = _check(labels, scores)
  colors = {0: "tab:blue", 2: "tab:orange", 1: "tab:red"}
  fileio.write_bytes(path, plots.histogram(
      [(CLASS_NAMES[c], s[y == c], colors[c]) for c in (0, 2, 1)],
      {"t_low": t_low, "t_high": t_high}, bins=bins, title=title, ylabel="pairs"))
  return path


def plot_macro_f1(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes a PNG bar chart of each metric's macro F1 (summary_row rows): at the configured
  thresholds and, where fitted, at its fitted thresholds. Returns path."""
  names = [r["name"] for r in rows]
  series = {"configured thresholds": [r.get("macro_f1") for r in rows]}
  if any(r.get("fitted_macro_f1") is not None for r in rows):
    series["fitted thresholds"] = [r.get("fitted_macro_f1") for r in rows]
  fileio.write_bytes(path, plots.bars(names, series, title="Macro F1 per metric",
                                      ylabel="macro F1", ylim=(0, 1.05)))
  return path


def read_labelled_pairs(path: str) -> dict[str, Any]:
  """Reads a labelled pair table: columns real_key, synth_key and label.

  The label column may also be called final_label (the reference's later test sets).

  Returns:
    {"real_key": list[str], "synth_key": list[str], "label": (n,) int64 array}, plus
    "raters" ((n, 3) int64: columns r1_label, r2_label, r3_label, the reference's annotated
    sets) and "ssim" ((n,) float64 ground-truth SSIM) when the file has them.

  Raises:
    InputError naming the file (and line): missing file or columns, an empty key, a label
    that is not an integer or not one of 0, 1, 2, no rows.
  """
  table = fileio.read_csv(path, required=("real_key", "synth_key"))
  col = "label" if "label" in table else "final_label" if "final_label" in table else None
  if col is None:
    raise fileio.InputError(f"{path}: missing column 'label'; found {list(table)}")
  if not table[col]:
    raise fileio.InputError(f"{path}: no labelled pairs")
  labels = _label_column(path, table[col], "label")
  for key in ("real_key", "synth_key"):
    for i, v in enumerate(table[key]):
      if not v.strip():
        raise fileio.InputError(f"{path}: line {i + 2}: empty {key}")
  out = {"real_key": [v.strip() for v in table["real_key"]],
         "synth_key": [v.strip() for v in table["synth_key"]], "label": labels}
  present = [c for c in RATER_COLUMNS if c in table]
  if present:  # the reference's annotated test sets: one label column per rater
    missing = [c for c in RATER_COLUMNS if c not in table]
    if missing:
      raise fileio.InputError(f"{path}: has {present} but not {missing}: rater columns "
                              f"come as a set {list(RATER_COLUMNS)}")
    out["raters"] = np.stack([_label_column(path, table[c], c) for c in RATER_COLUMNS], 1)
  if "ssim" in table:  # ground-truth SSIM of each pair (regression errors)
    try:
      ssim = np.asarray([float(v) for v in table["ssim"]], np.float64)
    except ValueError as e:
      raise fileio.InputError(f"{path}: column 'ssim': {e}") from None
    if not np.isfinite(ssim).all():
      raise fileio.InputError(f"{path}: column 'ssim': line "
                              f"{int(np.flatnonzero(~np.isfinite(ssim))[0]) + 2} is not finite")
    out["ssim"] = ssim
  return out


def _label_column(path: str, values: Sequence[str], name: str) -> np.ndarray:
  labels = np.empty(len(values), np.int64)
  for i, v in enumerate(values):
    v = v.strip()
    if not _INT_RE.match(v):
      raise fileio.InputError(f"{path}: line {i + 2}: {name} {v!r} is not an integer")
    if int(v) not in LABELS:
      raise fileio.InputError(f"{path}: line {i + 2}: {name} {int(v)} is not one of "
                              f"{_LABELS_TEXT}")
    labels[i] = int(v)
  return labels


def fleiss_kappa_counts(counts: np.ndarray) -> float:
  """Fleiss' kappa of an (items, categories) table of how many raters chose each category
  (Fleiss 1971; every item rated by the same number of raters)."""
  counts = np.asarray(counts, np.float64)
  raters = counts.sum(1)
  if counts.ndim != 2 or len(counts) == 0 or not np.all(raters == raters[0]) or raters[0] < 2:
    raise ValueError("fleiss_kappa: an (items, categories) table, every item rated by the "
                     "same number (>= 2) of raters")
  m = raters[0]
  p_item = ((counts ** 2).sum(1) - m) / (m * (m - 1))  # agreement on each item
  p_cat = counts.sum(0) / counts.sum()
  p_bar, p_e = p_item.mean(), (p_cat ** 2).sum()
  return float("nan") if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def fleiss_kappa(ratings: np.ndarray, categories: Sequence[int] = LABELS) -> float:
  """Fleiss' kappa of (items, raters) category labels (the reference's inter-rater
  agreement on its annotated test set: columns r1_label, r2_label, r3_label)."""
  ratings = np.asarray(ratings)
  counts = np.stack([(ratings == c).sum(1) for c in categories], 1)
  return fleiss_kappa_counts(counts)


def regression_errors(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """MAE and RMSE of scores against ground-truth SSIM, with the spreads the reference's
  eval_regression.py prints: std of |error| for the MAE, std of error^2 for the RMSE."""
  d = np.asarray(scores, np.float64) - np.asarray(target, np.float64)
  return {"mae": float(np.abs(d).mean()), "mae_std": float(np.abs(d).std()),
          "rmse": float(np.sqrt((d ** 2).mean())), "rmse_std": float((d ** 2).std())}


def write_results(path: str, results: Mapping[str, Any]) -> str:
  """Writes results as JSON atomically (NaN/inf become null). Returns path."""
  fileio.write_json(path, fileio.json_ready(results))
  return path


def summary_row(name: str, results: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens evaluate_scores' dict into one table row (for results_table)."""
  row = {"name": name, "t_low": results["t_low"], "t_high": results["t_high"]}
  for c in (CLASS_NAMES[k] for k in (0, 2, 1)):
    row[f"P_{c}"] = results["per_class"][c]["precision"]
    row[f"R_{c}"] = results["per_class"][c]["recall"]
  for key in ("macro_f1", "weighted_f1", "accuracy", "silhouette", "tpr_at_5fpr", "n"):
    row[key] = results[key]
  return row


def results_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
  """A plain aligned text table, one row per metric/checkpoint, columns in first-seen order.

  Floats are printed with `digits` decimals; missing or None values as "-".
  """
  cols: list[str] = []
  for r in rows:
    cols += [c for c in r if c not in cols]

  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, (float, np.floating)):
      return "nan" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)

  cells = [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(cols)]

  def line(vals):
    return "  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(vals, widths)))

  out = [line(cols), "  ".join("-" * w for w in widths)]
  out += [line(r) for r in cells]
  return "\n".join(out)
