"""Known answers of an audit: which synthetic images are copies, and how each rule does.

An audit can be checked when it is known which synthetic images copy a training image
(planted copies, the demo's generated sets): audit.truth names a CSV `synth_id,
memorized[, source_id]` covering every synthetic image (`read_truth`), or 'auto' for the
demo's own labels (`load_truth`). `validate` then scores every decision rule (the paper's
thresholds and each calibrated verdict of deepssim_jax.calibrate, `rule_decisions`) against
them: precision, recall, false-positive rate, the ROC AUC of the nearest-training score
and, with sources, how often a flagged copy is matched to the image it was made from.
Synthetic and source ids are compared in either spelling (fileio.canonical_key).
"""

import os
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np
from sklearn import metrics as skm

from deepssim_jax import fileio

TRUTH_COLUMNS = ("synth_id", "memorized")
# Calibrated decision rules -> their audit.csv column (the paper's rule is class == 1).
CALIBRATED_RULES = {"dar": "dar_memorized", "mi": "mi_memorized",
                    "carlini": "carlini_memorized"}


def read_truth(path: str, synth_ids: np.ndarray) -> dict[str, np.ndarray]:
  """Known answers from a CSV (synth_id, memorized 0/1, optional source_id), in the order
  of `synth_ids`.

  Returns:
    {"memorized": (n,) bool[, "source": (n,) str training id each copy derives from]}.

  Raises:
    InputError: missing columns, a memorized value other than 0/1, a repeated id, or ids
      that do not match the synthetic set's (named, with counts).
  """
  t = fileio.read_csv(path, required=TRUTH_COLUMNS)
  raw = np.asarray(t["synth_id"], dtype=str)
  bad = [i for i, v in enumerate(t["memorized"]) if v.strip() not in ("0", "1")]
  if bad:
    raise fileio.InputError(f"{path}: line {bad[0] + 2}: memorized must be 0 or 1, got "
                            f"{t['memorized'][bad[0]]!r}")
  # Ids in either spelling, ours or the reference's `<uid>___<name>` (fileio.canonical_key).
  ids = np.asarray([fileio.canonical_key(k) for k in raw.tolist()], dtype=str)
  if len(np.unique(ids)) != len(ids):
    _, first, c = np.unique(ids, return_index=True, return_counts=True)
    raise fileio.InputError(f"{path}: synth_id {str(raw[first[c > 1][0]])!r} appears more "
                            "than once")
  given = np.asarray(synth_ids, dtype=str)
  want = np.asarray([fileio.canonical_key(k) for k in given.tolist()], dtype=str)
  missing, extra = given[~np.isin(want, ids)], raw[~np.isin(ids, want)]
  if len(missing) or len(extra):
    raise fileio.InputError(
        f"{path}: ids do not match the synthetic set: {len(missing)} synthetic images have "
        f"no row (e.g. {[str(x) for x in missing[:3]]}), {len(extra)} rows name no "
        f"synthetic image (e.g. {[str(x) for x in extra[:3]]})")
  order = fileio.key_rows(ids, want, f"truth rows ({path})")
  out = {"memorized": np.array([v.strip() == "1" for v in t["memorized"]])[order]}
  if "source_id" in t:
    out["source"] = np.asarray(t["source_id"], dtype=str)[order]
  return out


def load_truth(config: ml_collections.ConfigDict, workdir: str, synth_ids: np.ndarray
               ) -> Optional[dict[str, np.ndarray]]:
  """The known answers config.audit.truth names for the synthetic ids: a CSV (read_truth),
  the demo's own labels for 'auto' on a demo set (its bank cached in <workdir>/data), or
  None."""
  what = config.audit.truth
  if what and what != "auto":
    return read_truth(what, synth_ids)
  name = config.audit.synthetic
  spec = config.data.get(name) if name else None
  if what != "auto" or spec is None or spec.get("kind") != "demo":
    return None
  from deepssim_jax import banks  # pylint: disable=g-import-not-at-top
  b = banks.bank(spec, config, os.path.join(workdir, "data"), name)
  meta = b.get("meta", {})
  if "label" not in meta:
    return None
  pos = fileio.key_rows(np.asarray(b["keys"], str), np.asarray(synth_ids, str),
                        "synthetic images (demo labels)")
  return {"memorized": np.asarray(meta["label"]).astype(int)[pos] == 1,
          "source": np.asarray(meta["source_key"], str)[pos]}


def rule_decisions(classes: np.ndarray, columns: Mapping[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
  """Every decision rule's verdicts: {"paper": class == 1 (Duplicate), and each of
  CALIBRATED_RULES whose column the calibrations wrote: column == 1}."""
  out = {"paper": np.asarray(classes) == 1}
  out.update({rule: np.asarray(columns[col]) == 1
              for rule, col in CALIBRATED_RULES.items() if col in columns})
  return out


def validate(truth: Mapping[str, np.ndarray], decisions: Mapping[str, np.ndarray],
             nearest_score: np.ndarray, nearest_id: np.ndarray) -> dict[str, Any]:
  """How each decision rule does against known answers.

  Args:
    truth: {"memorized": (n,) bool[, "source": (n,) str training id each copy derives
      from]}.
    decisions: {rule: (n,) bool flagged}.
    nearest_score, nearest_id: (n,) each synthetic image's nearest training score and id.

  Returns:
    {"n_memorized", "n_not_memorized", "auc" (nearest score, memorized vs not; None when one
    side is empty), "rules": {rule: {tp, fp, fn, tn, precision, recall,
    false_positive_rate}} (None where undefined), "source_match" (share of flagged true
    copies whose nearest training image is their source; with sources only)}.
  """
  y = np.asarray(truth["memorized"], bool)
  ratio = lambda a, b: float(a / b) if b else None  # noqa: E731
  out = {"n_memorized": int(y.sum()), "n_not_memorized": int((~y).sum()),
         "auc": (float(skm.roc_auc_score(y, nearest_score)) if 0 < y.sum() < len(y)
                 else None),
         "rules": {}}
  for rule, flagged in decisions.items():
    f = np.asarray(flagged, bool)
    tp, fp = int(np.sum(f & y)), int(np.sum(f & ~y))
    fn, tn = int(np.sum(~f & y)), int(np.sum(~f & ~y))
    out["rules"][rule] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
                          "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
                          "false_positive_rate": ratio(fp, fp + tn)}
  if "source" in truth and "paper" in decisions:
    hit = np.asarray(decisions["paper"], bool) & y
    same = [fileio.canonical_key(a) == fileio.canonical_key(b) for a, b in  # either spelling
            zip(np.asarray(nearest_id, str)[hit], np.asarray(truth["source"], str)[hit])]
    out["source_match"] = ratio(np.sum(same), hit.sum())
  return out
