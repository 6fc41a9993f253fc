"""Three-class evaluation: metrics equal scikit-learn's, threshold search, files, errors."""

import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from deepssim_jax import evaluate, fileio


def _fixed_case():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, size=200)
  centre = np.array([0.3, 0.95, 0.72])[labels]
  scores = np.clip(centre + rng.normal(0, 0.12, size=200), -1, 1)
  return labels, scores


def test_classify_rule_boundaries():
  s = np.array([-1.0, 0.60, 0.6000001, 0.85, 0.8500001, 1.0])
  np.testing.assert_array_equal(evaluate.classify(s), [0, 0, 2, 2, 1, 1])
  np.testing.assert_array_equal(evaluate.classify(s, 0.5, 0.5), [0, 1, 1, 1, 1, 1])
  with pytest.raises(ValueError):
    evaluate.classify(s, 0.9, 0.1)


def test_evaluate_scores_equals_sklearn():
  labels, scores = _fixed_case()
  res = evaluate.evaluate_scores(labels, scores, 0.6, 0.85)
  # Independent computation: the rule written out, then scikit-learn's functions.
  pred = np.array([0 if v <= 0.6 else 1 if v > 0.85 else 2 for v in scores])
  p, r, f, sup = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2],
                                                     zero_division=0)
  for i, name in enumerate(["different", "duplicate", "similar"]):
    assert res["per_class"][name]["precision"] == pytest.approx(p[i])
    assert res["per_class"][name]["recall"] == pytest.approx(r[i])
    assert res["per_class"][name]["f1"] == pytest.approx(f[i])
    assert res["per_class"][name]["support"] == sup[i]
  report = skm.classification_report(labels, pred, zero_division=0, output_dict=True)
  assert res["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
  assert res["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"])
  assert res["accuracy"] == pytest.approx(np.mean(pred == labels))
  np.testing.assert_array_equal(res["confusion"], skm.confusion_matrix(labels, pred))
  assert res["silhouette"] == pytest.approx(skm.silhouette_score(scores.reshape(-1, 1), labels))
  assert res["counts_true"] == {"different": int(np.sum(labels == 0)),
                                "duplicate": int(np.sum(labels == 1)),
                                "similar": int(np.sum(labels == 2))}
  fpr, tpr, _ = skm.roc_curve((labels == 1).astype(int), scores)
  assert res["tpr_at_5fpr"] == pytest.approx(tpr[np.flatnonzero(fpr <= 0.05)[-1]])
  assert 0 < res["macro_f1"] < 1


def test_single_class_and_absent_predictions():
  labels = np.zeros(6, int)
  scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9, 0.95])
  res = evaluate.evaluate_scores(labels, scores)
  assert res["silhouette"] is None and res["tpr_at_5fpr"] is None
  pred = evaluate.classify(scores)
  assert res["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro",
                                                       zero_division=0))
  assert res["per_class"]["duplicate"]["recall"] == 0.0


def test_silhouette_1d_equals_sklearn():
  rng = np.random.default_rng(0)
  for n, n_cls in [(50, 2), (300, 3), (41, 3)]:
    labels = rng.integers(0, n_cls, size=n)
    labels[:n_cls] = np.arange(n_cls)
    x = rng.normal(size=n) + labels
    x[5] = x[6]  # a tie
    want = skm.silhouette_score(x.reshape(-1, 1), labels)
    assert evaluate.silhouette_1d(x, labels) == pytest.approx(want, abs=1e-12)
  # A singleton cluster scores 0 in both.
  labels = np.array([0, 0, 0, 1, 2, 2])
  x = np.array([0.1, 0.2, 0.25, 0.5, 0.9, 0.95])
  assert evaluate.silhouette_1d(x, labels) == pytest.approx(
      skm.silhouette_score(x.reshape(-1, 1), labels), abs=1e-12)


def test_fit_thresholds_separated_clusters():
  rng = np.random.default_rng(1)
  diff = rng.uniform(0.0, 0.3, 40)
  sim = rng.uniform(0.5, 0.7, 30)
  dup = rng.uniform(0.9, 1.0, 20)
  scores = np.concatenate([diff, sim, dup])
  labels = np.array([0] * 40 + [2] * 30 + [1] * 20)
  fit = evaluate.fit_thresholds(labels, scores)
  assert fit["macro_f1"] == 1.0
  assert diff.max() <= fit["t_low"] < sim.min()
  assert sim.max() <= fit["t_high"] < dup.min()
  res = evaluate.evaluate_scores(labels, scores, fit["t_low"], fit["t_high"])
  assert res["macro_f1"] == 1.0 and res["accuracy"] == 1.0


def test_fit_thresholds_is_the_exhaustive_optimum():
  labels, scores = _fixed_case()
  grid = np.linspace(0.0, 1.0, 21)
  fit = evaluate.fit_thresholds(labels, scores, grid=grid)
  best, arg = -1.0, None
  for lo, hi in itertools.product(grid, grid):
    if lo > hi:
      continue
    pred = np.where(scores <= lo, 0, np.where(scores > hi, 1, 2))
    f = skm.f1_score(labels, pred, average="macro", zero_division=0)
    if f > best + 1e-12:
      best, arg = f, (lo, hi)
  assert fit["macro_f1"] == pytest.approx(best)
  assert (fit["t_low"], fit["t_high"]) == pytest.approx(arg)
  # The default grid (midpoints) can only do better than the coarse one.
  assert evaluate.fit_thresholds(labels, scores)["macro_f1"] >= best - 1e-12


def test_read_labelled_pairs_and_errors(tmp_path):
  good = tmp_path / "pairs.csv"
  good.write_text("real_key,synth_key,label\nr1,s1,0\nr2,s2,1\nr3,s3,2\n")
  pairs = evaluate.read_labelled_pairs(str(good))
  assert pairs["real_key"] == ["r1", "r2", "r3"]
  np.testing.assert_array_equal(pairs["label"], [0, 1, 2])
  alias = tmp_path / "final.csv"
  alias.write_text("real_key,synth_key,final_label\nr1,s1,2\n")
  np.testing.assert_array_equal(evaluate.read_labelled_pairs(str(alias))["label"], [2])
  cases = {
      "nolabel.csv": ("real_key,synth_key\nr1,s1\n", "label"),
      "nokey.csv": ("real_key,label\nr1,1\n", "synth_key"),
      "range.csv": ("real_key,synth_key,label\nr1,s1,0\nr2,s2,3\n", "line 3"),
      "float.csv": ("real_key,synth_key,label\nr1,s1,1.5\n", "line 2"),
      "text.csv": ("real_key,synth_key,label\nr1,s1,dup\n", "not an integer"),
      "empty.csv": ("real_key,synth_key,label\n", "no labelled pairs"),
  }
  for name, (text, needle) in cases.items():
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(fileio.InputError, match=needle) as e:
      evaluate.read_labelled_pairs(str(path))
    assert name in str(e.value)


def test_bad_labels_and_scores():
  with pytest.raises(ValueError, match="not one of"):
    evaluate.evaluate_scores([0, 1, 5], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="as many"):
    evaluate.evaluate_scores([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="finite"):
    evaluate.fit_thresholds([0, 1], [0.1, np.nan])


def test_files_histogram_json_table(tmp_path):
  labels, scores = _fixed_case()
  png = evaluate.plot_histogram(str(tmp_path / "h" / "hist.png"), scores, labels, 0.6, 0.85,
                                "test")
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size[0] > 100
    assert np.asarray(im.convert("L")).std() > 0  # not a blank image
  res = evaluate.evaluate_scores(labels[:3], scores[:3])
  res["extra"] = float("nan")
  path = evaluate.write_results(str(tmp_path / "r.json"), res)
  with open(path) as f:
    back = json.load(f)
  assert back["extra"] is None and back["macro_f1"] == pytest.approx(res["macro_f1"])
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  rows = [evaluate.summary_row("ckpt-1", evaluate.evaluate_scores(labels, scores)),
          evaluate.summary_row("ckpt-2", res)]
  table = evaluate.results_table(rows)
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].split()[0] == "name"
  assert f"{rows[0]['macro_f1']:.4f}" in lines[2] and "ckpt-2" in lines[3]
  assert len({len(line) for line in lines}) == 1  # aligned


def test_macro_f1_bar_chart_draws_one_bar_per_value(tmp_path):
  labels, scores = _fixed_case()
  rows = [evaluate.summary_row(n, evaluate.evaluate_scores(labels, s))
          for n, s in (("good", scores), ("noise", np.random.default_rng(1).random(200)))]
  rows[0]["fitted_macro_f1"] = 0.9  # fitted thresholds for one metric only
  png = evaluate.plot_macro_f1(str(tmp_path / "f1.png"), rows)
  with Image.open(png) as im:
    grey = np.asarray(im.convert("L"))
  assert grey.std() > 0
  from deepssim_jax import plots  # pylint: disable=g-import-not-at-top
  fewer = plots.bars(["good", "noise"], {"a": [0.5, None]})
  more = plots.bars(["good", "noise"], {"a": [0.5, 0.4]})
  assert fewer != more  # a missing value leaves its bar out
  with pytest.raises(ValueError, match="1 values for 2 names"):
    plots.bars(["good", "noise"], {"a": [0.5]})


# Fleiss (1971) as tabulated in Wikipedia's "Fleiss' kappa" article: 10 items, 14 raters,
# 5 categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_hand_computed_and_statsmodels():
  assert evaluate.fleiss_kappa_counts(FLEISS_TABLE) == pytest.approx(0.20993, abs=5e-5)
  assert evaluate.fleiss_kappa([[1, 1, 1], [0, 0, 0], [2, 2, 2]]) == pytest.approx(1.0)
  # By hand: per-item agreement P_i = 1, 1/3, 1, so P_bar = 7/9; category shares 5/9 and
  # 4/9, so P_e = 41/81; kappa = (63/81 - 41/81) / (40/81) = 0.55.
  assert evaluate.fleiss_kappa([[0, 0, 0], [0, 0, 1], [1, 1, 1]]) == pytest.approx(0.55)
  # Total disagreement on one item, full agreement on the other: kappa 0 (P_bar = P_e = 1/2).
  assert evaluate.fleiss_kappa([[0, 0, 0], [0, 1, 2]]) == pytest.approx(0.0)
  from statsmodels.stats import inter_rater  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for _ in range(5):
    truth = rng.integers(0, 3, 60)
    ratings = np.where(rng.random((60, 3)) < 0.7, truth[:, None], rng.integers(0, 3, (60, 3)))
    table, _ = inter_rater.aggregate_raters(ratings, n_cat=3)
    assert evaluate.fleiss_kappa(ratings) == pytest.approx(inter_rater.fleiss_kappa(table),
                                                           abs=1e-12)
  with pytest.raises(ValueError, match="same number"):
    evaluate.fleiss_kappa_counts([[1, 1], [2, 1]])


def test_regression_errors_closed_form():
  target = np.array([0.1, 0.5, 0.9, 0.3])
  err = np.array([0.1, -0.2, 0.0, 0.3])
  r = evaluate.regression_errors(target + err, target)
  assert r["mae"] == pytest.approx(0.15) and r["rmse"] == pytest.approx(np.sqrt(0.035))
  assert r["mae_std"] == pytest.approx(np.std([0.1, 0.2, 0.0, 0.3]))
  assert r["rmse_std"] == pytest.approx(np.std([0.01, 0.04, 0.0, 0.09]))


def test_rater_and_ssim_columns_are_read_and_checked(tmp_path):
  p = tmp_path / "t.csv"
  p.write_text("real_key,synth_key,final_label,r1_label,r2_label,r3_label,ssim\n"
               "a,b,1,1,1,2,0.91\nc,d,0,0,0,0,0.2\n")
  t = evaluate.read_labelled_pairs(str(p))
  np.testing.assert_array_equal(t["raters"], [[1, 1, 2], [0, 0, 0]])
  np.testing.assert_allclose(t["ssim"], [0.91, 0.2])
  p.write_text("real_key,synth_key,label,r1_label,r2_label\na,b,1,1,1\n")
  with pytest.raises(fileio.InputError, match=r"t\.csv: has .* but not \['r3_label'\]"):
    evaluate.read_labelled_pairs(str(p))
  p.write_text("real_key,synth_key,label,r1_label,r2_label,r3_label\na,b,1,1,7,1\n")
  with pytest.raises(fileio.InputError, match=r"line 2: r2_label 7 is not one of"):
    evaluate.read_labelled_pairs(str(p))
  p.write_text("real_key,synth_key,label,ssim\na,b,1,nan\n")
  with pytest.raises(fileio.InputError, match=r"column 'ssim': line 2 is not finite"):
    evaluate.read_labelled_pairs(str(p))
