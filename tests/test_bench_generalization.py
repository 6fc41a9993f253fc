"""bench/bench_generalization.py's levers and table: each lever's config is the recipe with
its chain of bases' settings applied root first, and the table's rows say what they claim."""

import importlib.util
import os

import numpy as np
import pytest

from deepssim_jax import evaluate, validate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location(
      "bench_generalization", os.path.join(ROOT, "bench", "bench_generalization.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_lever_is_a_valid_config_without_the_held_out_head(bench):
  _, recipe = bench.builtin_config()
  for lever in bench.LEVERS:
    c = bench.lever_config(lever, "robex")
    validate.check_deepssim(c, "train", num_devices=4)
    heads = [h[0] for h in c.data.demo.train_heads]
    assert "robex" not in heads and len(heads) == len(recipe.data.demo.train_heads) - 1
  for lever, base in bench.DERIVED.items():
    assert base in bench.LEVERS and bench.base_of(lever) == base


def test_lever_chains_apply_their_bases_settings_root_first(bench):
  _, recipe = bench.builtin_config()
  c = bench.lever_config("recipe", "colin27")
  assert c.train.num_epochs == recipe.train.num_epochs
  assert c.model.overrides.dropout == recipe.model.overrides.dropout
  e9 = bench.lever_config("epochs9", "colin27")
  assert e9.train.num_epochs == 9 and e9.model.overrides.dropout == 0.0
  d = bench.lever_config("dropout_short", "colin27")  # on epochs9: its own settings win
  assert (d.train.num_epochs, d.optim.learning_rate, d.model.overrides.dropout) == (3, 1e-3, 0.33)
  assert d.model.overrides.dims == recipe.model.overrides.dims  # overrides merge, not replace
  g = bench.lever_config("gem", "colin27")  # gem -> no_shape -> dropout_short -> epochs9
  assert g.model.head == "gem" and g.aug.p_shape == 0.0 and g.train.num_epochs == 3
  assert g.model.overrides.dropout == 0.33 and g.aug.p_contrast == recipe.aug.p_contrast
  b = bench.lever_config("blur", "colin27")
  assert b.aug.p_blur == 0.5 and b.train.num_epochs == recipe.train.num_epochs
  p = bench.lever_config("planes", "colin27")  # a setting three levels deep (data.demo.*)
  assert [plane for plane, _, _ in p.data.demo.extra_planes] == ["coronal", "sagittal"]
  assert p.data.demo.extra_slices_per_head == 20 and "extra_planes" not in recipe.data.demo
  assert bench.lever_config("elastic", "colin27").aug.p_elastic == 0.5 > recipe.aug.p_elastic


def test_the_recipe_is_scored_aligned_and_flips_is_the_recipe_before(bench):
  """The recipe (configs/builtin.py) trains without flips and is scored aligned; flips is
  the recipe before 2026-12-04 (flips, rotations up to 0.17 rad, plain scoring) with
  everything else equal; rigid_light is the recipe's training scored plainly, so its
  cached folds are the recipe's."""
  import json  # pylint: disable=g-import-not-at-top
  r, f, rl = (json.loads(bench.lever_config(lever, "robex").to_json())
              for lever in ("recipe", "flips", "rigid_light"))
  assert r["model"]["align"] and (r["aug"]["p_flip0"], r["aug"]["p_flip1"]) == (0.0, 0.0)
  assert r["aug"]["max_angle"] == pytest.approx(np.deg2rad(1.5), abs=2e-4)
  changed = {"p_flip0": 0.33, "p_flip1": 0.33, "max_angle": 0.17}
  assert {k: f["aug"][k] for k in changed} == changed and not f["model"]["align"]
  f["aug"].update({k: r["aug"][k] for k in changed})
  f["model"]["align"] = True
  assert f == r
  rl["model"]["align"] = True
  assert rl == r
  assert bench.base_of("epochs9") == "flips" and bench.base_of("flips") == "recipe"
  # The built-in ensemble's second network (configs/builtin.py:neighbours) is the lever
  # rigid_neighbours, trained on every head.
  mod, _ = bench.builtin_config()
  nb = json.loads(bench.lever_config("rigid_neighbours", "robex").to_json())
  member = json.loads(mod.get_config("neighbours").to_json())
  member["data"]["demo"]["train_heads"] = nb["data"]["demo"]["train_heads"]
  assert member["workdir"] == "workdirs/builtin_neighbours"
  member["workdir"] = nb["workdir"]
  assert member == nb
  assert bench.ENSEMBLES["ensemble_rigid_nb"] == ("recipe", "rigid_neighbours")
  with pytest.raises(ValueError, match="no member 'wide'"):
    mod.get_config("wide")


def test_pair_scores_plain_or_aligned(bench):
  """pair_scores: cosines of the pairs' embeddings, or align.aligned_scores (the pixel
  embedding here: the best correlation over the rigid candidates) with the share moved."""
  from deepssim_jax import align  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 16, 12)).astype(np.float32)
  x = np.concatenate([x, x[:2, ::-1]])  # two flipped copies
  pairs = np.array([[0, 4], [1, 5], [2, 2]])  # an image with itself: not moved
  model = type("M", (), {"embed": staticmethod(align.unit_rows)})
  s, more = bench.pair_scores(model, x, pairs, aligned=False)
  e = align.unit_rows(x)
  np.testing.assert_allclose(s, np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1), atol=1e-6)
  assert more == {}
  s, more = bench.pair_scores(model, x, pairs, aligned=True)
  np.testing.assert_allclose(s, align.aligned_scores(align.unit_rows, x, x, pairs=pairs)[0])
  np.testing.assert_allclose(s, 1.0, atol=1e-5)
  assert more == {"moved": pytest.approx(2 / 3)}


HERE = {"cpu": "A", "jax": "0.10.2"}  # an environment (benchlib.environment's fields)


def _result(bench, lever, head, labels, scores, ssim_scores, environment=None):
  labels = np.asarray(labels)
  return {"lever": lever, "held_out": head, "environment": environment or HERE,
          "contrasts": {"T1": {
      "deepssim": evaluate.evaluate_scores(labels, np.asarray(scores)),
      "ssim": evaluate.evaluate_scores(labels, np.asarray(ssim_scores)),
      "scores": list(scores), "ssim_scores": list(ssim_scores), "labels": labels.tolist()}}}


def test_table_rows_deltas_and_ssim_ceiling(bench):
  # Two pairs per class: Duplicate (1), Similar (2), Different (0).
  labels = [1, 1, 2, 2, 0, 0]
  ssim = [0.3, 0.5, 0.7, 0.8, 0.2, 0.1]  # copies misread by SSIM; the rest right
  perfect = [0.95, 0.9, 0.7, 0.75, 0.1, 0.2]
  wrong_similar = [0.95, 0.9, 0.9, 0.95, 0.1, 0.2]  # Similar scored as Duplicate
  md = bench.table([_result(bench, "flips", "colin27", labels, perfect, ssim),
                    _result(bench, "epochs9", "colin27", labels, wrong_similar, ssim)])
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
          for line in md.splitlines()[2:]}
  assert rows[("flips", "T1")][0] == "1.000" and rows[("flips", "T1")][2] == "-"
  f1 = evaluate.evaluate_scores(np.asarray(labels), np.asarray(wrong_similar))["macro_f1"]
  assert rows[("epochs9", "T1")][0] == f"{f1:.3f}"
  assert rows[("epochs9", "T1")][2] == f"{f1 - 1.0:+.3f}"  # against its base, flips
  assert rows[("plain SSIM", "T1")][0] != "1.000"
  assert rows[(bench.CEILING, "T1")][0] == "1.000"  # copies as 1, the rest by SSIM
  assert rows[(bench.CEILING, "T1")][3:] == ["1.00", "1.00", "1.00", "1.000"]
  # AUC Dup/Sim: copies above neighbours in every pair for flips; for epochs9, of the
  # 4 (copy, neighbour) orderings one is won (0.95 > 0.9), two tie, one is lost: 2 / 4
  assert rows[("flips", "T1")][-1] == "1.000"
  assert rows[("epochs9", "T1")][-1] == "0.500"
  assert rows[("plain SSIM", "T1")][-1] == "0.000"  # SSIM ranks every copy below


def test_ensemble_scores_are_the_members_mean_cosine(bench):
  labels = [1, 1, 2, 2, 0, 0]
  ssim = [0.3, 0.5, 0.7, 0.8, 0.2, 0.1]
  a = dict(_result(bench, "flips", "robex", labels, [0.95, 0.9, 0.9, 0.95, 0.1, 0.2], ssim),
           step=10, train_s=1.0)
  b = dict(_result(bench, "seed1", "robex", labels, [0.95, 0.9, 0.5, 0.6, 0.1, 0.7], ssim),
           step=10, train_s=2.0)
  e = bench.ensemble_scores("ensemble2", "robex", [a, b])
  got = e["contrasts"]["T1"]
  np.testing.assert_allclose(got["scores"], [0.95, 0.9, 0.7, 0.775, 0.1, 0.45])
  # Each member gets one Similar pair wrong; their mean gets every pair right.
  assert a["contrasts"]["T1"]["deepssim"]["macro_f1"] < 1.0
  assert b["contrasts"]["T1"]["deepssim"]["macro_f1"] < 1.0
  assert got["deepssim"]["macro_f1"] == 1.0 and e["train_s"] == 3.0
  assert got["ssim_scores"] == ssim and got["labels"] == labels
  assert set(bench.ENSEMBLES) <= set(bench.DERIVED)
  assert all(m in bench.LEVERS for members in bench.ENSEMBLES.values() for m in members)
  b["contrasts"]["T1"]["labels"] = [1, 1, 2, 0, 0, 0]
  with pytest.raises(ValueError, match="members scored different pairs"):
    bench.ensemble_scores("ensemble2", "robex", [a, b])


def test_levers_are_compared_with_their_base_only_in_one_environment(bench):
  """A cell retrained on another CPU or jax version moves as much as a lever does: the
  table prints no difference across environments, nor for unknown ones (results cached
  before environments were recorded) or ensembles of members from two of them."""
  import jax
  env = bench.benchlib.environment()
  assert env["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
  assert env["cpu"] and set(env) >= {"cpu_id", "jaxlib", "flax", "optax", "numpy", "python"}
  labels, ssim = [1, 1, 2, 2, 0, 0], [0.3, 0.5, 0.7, 0.8, 0.2, 0.1]
  perfect, wrong = [0.95, 0.9, 0.7, 0.75, 0.1, 0.2], [0.95, 0.9, 0.9, 0.95, 0.1, 0.2]
  there = {"cpu": "B", "jax": "0.10.2"}

  def delta(base_env):
    base = _result(bench, "flips", "robex", labels, perfect, ssim, base_env)
    if base_env == "unknown":
      del base["environment"]
    md = bench.table([base, _result(bench, "band3", "robex", labels, wrong, ssim)])
    return [line.split("|")[5].strip() for line in md.splitlines()  # one head: 5th cell
            if line.startswith("| band3 | T1 |")][0]

  assert delta(HERE).startswith("-0.")
  # The difference is taken on the heads both rows have, and says how many when fewer.
  two = [_result(bench, "flips", "robex", labels, perfect, ssim),
         _result(bench, "band3", "robex", labels, wrong, ssim),
         _result(bench, "band3", "colin27", labels, perfect, ssim)]
  row = [line for line in bench.table(two).splitlines() if line.startswith("| band3 | T1 |")]
  f1 = evaluate.evaluate_scores(np.asarray(labels), np.asarray(wrong))["macro_f1"]
  assert row[0].split("|")[6].strip() == f"{f1 - 1.0:+.3f} (n=1)"
  assert delta(there) == delta("unknown") == "other environment"
  a = dict(_result(bench, "flips", "robex", labels, perfect, ssim), step=1, train_s=1.0)
  b = dict(_result(bench, "seed1", "robex", labels, wrong, ssim, there), step=1, train_s=1.0)
  assert bench.ensemble_scores("ensemble2", "robex", [a, dict(a, lever="seed1")])[
      "environment"] == HERE
  assert bench.ensemble_scores("ensemble2", "robex", [a, b])["environment"] is None


def test_a_fold_records_the_environment_it_began_in(bench, tmp_path):
  here, there = dict(HERE), {"cpu": "B", "jax": "0.10.2"}
  fresh = str(tmp_path / "fresh")
  assert bench.started_in(fresh, here) == here  # begins here: written beside the run
  assert bench.started_in(fresh, there) == here  # resumed elsewhere: still where it began
  old = tmp_path / "old"
  (old / "checkpoints").mkdir(parents=True)
  assert bench.started_in(str(old), here) is None  # begun before environments were recorded
  assert not (old / "environment.json").exists()


def test_bootstrap_interval_of_a_cell(bench):
  """macro_f1_rows is scikit-learn's macro F1 row by row; a cell's interval holds its macro
  F1, is a point for a perfect scorer, and is wider with fewer pairs of the same mix."""
  from sklearn.metrics import f1_score
  rng = np.random.default_rng(0)
  y = np.tile(np.repeat([0, 1, 2], 8), (20, 1))
  pred = rng.integers(0, 3, size=y.shape)
  pred[0] = 1  # a row predicting one class only (zero_division)
  want = [f1_score(a, b, average="macro", zero_division=0) for a, b in zip(y, pred)]
  np.testing.assert_allclose(bench.macro_f1_rows(y, pred), want, atol=1e-12)
  labels = np.repeat([1, 2, 0], [40, 40, 80])
  perfect = np.where(labels == 1, 0.95, np.where(labels == 2, 0.7, 0.1))
  assert bench.macro_f1_interval(labels, perfect, rounds=200) == (1.0, 1.0)
  noisy = perfect + rng.normal(0, 0.12, len(labels))
  f1 = evaluate.evaluate_scores(labels, noisy)["macro_f1"]
  lo, hi = bench.macro_f1_interval(labels, noisy, rounds=500)
  assert lo < f1 < hi
  few = np.concatenate([np.flatnonzero(labels == c)[:10] for c in (0, 1, 2)])
  lo_few, hi_few = bench.macro_f1_interval(labels[few], noisy[few], rounds=500)
  assert hi_few - lo_few > hi - lo
  md = bench.interval_table([_result(bench, "recipe", "robex", list(labels), list(noisy),
                                     list(noisy))])
  row = [c.strip() for c in md.splitlines()[2].split("|")[1:-1]]
  assert row[:2] == ["recipe", "T1"] and row[2] == f"{f1:.3f} [{lo:.2f}, {hi:.2f}]"
  assert row[3] == f"{int(f1 >= 0.8)} / 1" and row[4] == f"{int(lo <= 0.8 <= hi)} / 1"
