"""No silent wrong answers from what a workdir already holds (issue 12).

* A refused training run (another model, more epochs) leaves config.json and the
  checkpoints as they were, and the old checkpoint still loads.
* Image banks and the pair table are rebuilt when their source or settings change (refused
  for the pair table of a trained workdir); --mode=evaluate rewrites no bank array.
* Generation refuses an output folder of samples made with other settings; output folder
  names are checked (separators, '..', collisions).

Tiny configs, in-process (conftest.py: 4 fake CPU devices).
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from deepssim_jax import config_lib, fileio, jobs, pairs, train
from deepssim_jax.data import write_png
from ldm_jax import generate, input_pipeline, train_diffusion

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def tiny_config():
  spec = importlib.util.spec_from_file_location(
      "tiny_multihost", os.path.join(ROOT, "configs", "tiny_multihost.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def snapshot(folder: str, skip=("eval", "tensorboard")) -> dict:
  """{relative path: (size, mtime_ns, bytes hash)} of every file under folder."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = [d for d in dirnames if d not in skip]
    for f in filenames:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns,
                                           fileio.fingerprint(fh.read()))
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny DeepSSIM run (demo data, held-out test pairs, evaluated once)."""
  wd = str(tmp_path_factory.mktemp("trained"))
  out = jobs.train_job(tiny_config(), wd)
  return wd, out


def test_evaluate_twice_rewrites_no_bank_array(trained):
  wd, _ = trained
  before = snapshot(wd)
  for name in ("data/real.npy", "data/synth.npy", "data/real.npz", "pairs.csv",
               "data/real.npz.record.json", "pairs.csv.record.json"):
    assert name in before, name
  jobs.evaluate_job(tiny_config(), wd)
  jobs.evaluate_job(tiny_config(), wd)
  assert snapshot(wd) == before  # banks, arrays, pair table, records, checkpoints


def test_evaluate_alone_builds_no_training_pair_table(tmp_path):
  # --mode=evaluate scores the labelled test pairs only: on a fresh workdir it builds the
  # banks and the held-out labelled pairs, never the training pair table (SSIM of every
  # training pair) nor the training arrays.
  c = tiny_config()
  c.eval.metrics = ("ssim",)
  wd = str(tmp_path)
  results = jobs.evaluate_job(c, wd)
  assert set(results) == {"ssim"} and results["ssim"]["fixed"]["n"] > 0
  assert os.path.isfile(os.path.join(wd, "test_pairs.csv"))
  assert os.path.isfile(os.path.join(wd, "eval", "results.json"))
  assert os.path.isfile(os.path.join(wd, "eval", "macro_f1.png"))
  for name in ("pairs.csv", "data/real.npy", "data/synth.npy"):
    assert not os.path.exists(os.path.join(wd, name)), name
  # The same scores as when the pair table is there (training prepares both).
  d = jobs.prepare_data(c, wd)
  assert os.path.isfile(os.path.join(wd, "pairs.csv"))
  again = jobs.evaluate_job(c, wd, data=d)
  assert again["ssim"]["fixed"] == results["ssim"]["fixed"]
  # Raters' columns give their agreement (here unanimous: kappa 1); a ground-truth ssim
  # column gives each metric's regression errors (here every pair's target is 0).
  t = fileio.read_csv(os.path.join(wd, "test_pairs.csv"), ["real_key", "synth_key", "label"])
  rows = [[r, s, lab, lab, lab, lab, "0"] for r, s, lab in
          zip(t["real_key"], t["synth_key"], t["label"])]
  fileio.write_csv(os.path.join(wd, "rated.csv"), ["real_key", "synth_key", "label", "r1_label",
                                                   "r2_label", "r3_label", "ssim"], rows)
  c.data.test_pairs_csv = os.path.join(wd, "rated.csv")
  rated = jobs.evaluate_job(c, wd, data={**d, "test_pairs": c.data.test_pairs_csv})
  with open(os.path.join(wd, "eval", "agreement.json")) as f:
    assert json.load(f)["fleiss_kappa"] == 1.0
  r = rated["ssim"]["regression"]
  assert 0 < r["mae"] <= r["rmse"] <= 1


def test_evaluate_reports_missing_weights_and_uses_reference_thresholds(tmp_path,
                                                                         monkeypatch):
  # The paper's table skips nothing silently: a baseline without weights is a row saying so
  # (and an entry in results.json); "random" scores with seeded random weights under a name
  # that says so; a weights path naming no file stops with an error naming it. A baseline
  # is classified at the reference's own thresholds (Dar: one binary threshold).
  from deepssim_jax import metrics, resnet  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(metrics.BASELINES["dar"], "make",
                      lambda ctx: resnet.Dar(stages=(1, 1, 1, 1)))  # a tiny trunk
  c = tiny_config()
  c.eval.metrics = ("ssim", "sscd", "dar")
  c.eval.weights.dar = "random"
  wd = str(tmp_path)
  results = jobs.evaluate_job(c, wd)
  assert set(results) == {"ssim", "sscd", "dar [random weights]"}
  assert "--config.eval.weights.sscd=" in results["sscd"]["missing"]
  dar = results["dar [random weights]"]["fixed"]
  assert dar["t_low"] == dar["t_high"] == metrics.BASELINES["dar"]["thresholds"][0]
  assert dar["counts_pred"]["similar"] == 0  # one binary threshold: never Similar
  assert results["ssim"]["fixed"]["t_low"] == c.eval.thresholds[0]
  with open(os.path.join(wd, "eval", "results.json")) as f:
    assert "missing" in json.load(f)["sscd"]
  with open(os.path.join(wd, "eval", "table.txt")) as f:
    table = f.read()
  assert "missing weights" in table and "dar [random weights]" in table
  c.eval.reference_thresholds = False  # the configured thresholds for every metric
  c.eval.metrics = ("dar",)
  assert jobs.evaluate_job(c, wd)["dar [random weights]"]["fixed"]["t_high"] == 0.85
  c.eval.weights.dar = str(tmp_path / "nowhere.pth")
  with pytest.raises(fileio.InputError, match="nowhere.pth: no such weights file"):
    jobs.evaluate_job(c, wd)


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.model.overrides, "embed_dim", 32),
     r"model\.overrides\.embed_dim: 16 -> 32"),
    (lambda c: setattr(c.train, "num_epochs", 3), r"epochs: 2 -> 3"),
])
def test_refused_training_leaves_config_and_checkpoints(trained, change, message):
  wd, out = trained
  before = snapshot(wd)
  c = tiny_config()
  change(c)
  with pytest.raises(fileio.InputError, match=message):
    jobs.train_job(c, wd)
  assert snapshot(wd) == before
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["model"]["overrides"]["embed_dim"] == 16
  _, variables, step = train.restore_model(wd, "latest")
  assert step == out["step"] and variables["params"]
  _, variables, _ = train.restore_model(wd, "best")  # the model of config.json loads
  assert variables["params"]


def test_stale_pair_table_of_a_trained_workdir_is_refused(trained):
  wd, _ = trained
  before = snapshot(wd)
  c = tiny_config()
  c.pairs.num_pairs = 40
  with pytest.raises(fileio.InputError, match=r"num_pairs: 48 -> 40.*trained on it.*pairs_csv"):
    jobs.prepare_data(c, wd)
  c = tiny_config()
  c.data.demo.num_copies = 6  # another synthetic bank
  with pytest.raises(fileio.InputError, match=r"pair table.*synth:"):
    jobs.prepare_data(c, wd)
  assert snapshot(wd) == before  # the banks were not rebuilt either
  # The escape hatch: the table as it is, read and never written.
  c.data.pairs_csv = os.path.join(wd, "pairs.csv")
  c.data.demo.num_copies = 8
  d = jobs.prepare_data(c, wd)
  assert len(d["table"]) == len(pairs.read_pairs(os.path.join(wd, "pairs.csv")))
  assert snapshot(wd) == before


def _png_folder(folder, seed, n=6):
  rng = np.random.default_rng(seed)
  for i in range(n):
    x = np.kron(rng.normal(size=(8, 8)), np.ones((4, 4)))
    write_png(os.path.join(folder, f"img{i}.png"), x)
  return str(folder)


def test_other_root_or_pair_settings_rebuild_banks_and_table(tmp_path):
  a = _png_folder(tmp_path / "a", 0)
  b = _png_folder(tmp_path / "b", 1)
  s = _png_folder(tmp_path / "s", 2)
  c = tiny_config()
  c.data.real = config_lib.source_config("pngs", root=a)
  c.data.synth = config_lib.source_config("pngs", root=s)
  c.data.test_fraction = 0.0
  c.pairs.num_pairs = 20
  wd = str(tmp_path / "work")
  first = jobs.prepare_data(c, wd)
  assert len(first["table"]) == 20
  t0 = snapshot(wd)

  c.pairs.num_pairs = 12  # the table is rebuilt, the banks are kept
  d = jobs.prepare_data(c, wd)
  assert len(d["table"]) == 12 == len(pairs.read_pairs(os.path.join(wd, "pairs.csv")))
  t1 = snapshot(wd)
  for name in ("data/real.npz", "data/real.npy", "data/synth.npz", "data/synth.npy"):
    assert t1[name] == t0[name], name
  assert t1["pairs.csv"] != t0["pairs.csv"]
  with open(os.path.join(wd, "pairs.csv.record.json")) as f:
    assert json.load(f)["num_pairs"] == 12

  c.data.real.root = b  # another data root: its images, and a new table
  d = jobs.prepare_data(c, wd)
  t2 = snapshot(wd)
  assert not np.allclose(d["real"]["images"], first["real"]["images"])
  np.testing.assert_array_equal(np.load(os.path.join(wd, "data", "real.npy")),
                                d["real"]["images"])
  assert t2["data/real.npz"] != t1["data/real.npz"]
  assert t2["data/synth.npz"] == t1["data/synth.npz"]
  assert t2["pairs.csv.record.json"] != t1["pairs.csv.record.json"]

  # The same folder with a changed file: rebuilt too (names, sizes, mtimes).
  write_png(os.path.join(b, "img0.png"), np.kron(np.eye(8), np.ones((4, 4))))
  d = jobs.prepare_data(c, wd)
  assert not np.allclose(d["real"]["images"][0], first["real"]["images"][0])
  t3 = snapshot(wd)
  assert t3["data/real.npz"] != t2["data/real.npz"]

  # Nothing changed: nothing is written.
  jobs.prepare_data(c, wd)
  assert snapshot(wd) == t3

  # A given pair table is never rewritten, whatever changed.
  given = str(tmp_path / "given.csv")
  pairs.write_pairs(given, d["table"])
  mtime = os.stat(given).st_mtime_ns
  c.data.pairs_csv = given
  c.pairs.num_pairs = 5
  assert len(jobs.prepare_data(c, wd)["table"]) == 12
  assert os.stat(given).st_mtime_ns == mtime and not os.path.exists(given + ".record.json")


# ----------------------------------------------------------------------------- ldm_jax


def test_output_folder_names_are_checked():
  keys = ["h1/z001", "h2/z001"]
  assert generate.output_folders(keys, [input_pipeline.uid_of(k) for k in keys]) == [
      "h1-z001", "h2-z001"]
  keys = ["a/b", "x/y", "a-b"]
  with pytest.raises(fileio.InputError, match=r"'a/b' and 'a-b' map to one output folder 'a-b'"):
    generate.output_folders(keys, [input_pipeline.uid_of(k) for k in keys])
  for key in ("..", ".", ".hidden/x", "a\\b", ""):
    with pytest.raises(fileio.InputError, match="not a plain folder name"):
      generate.output_folders([key], [input_pipeline.uid_of(key)])


def dm_config():
  from ldm_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.diffusion_config()
  c.data.image_size = (16, 16)
  c.data.train.part = "real"
  c.data.demo.update(dict(slices_per_head=2, num_copies=1, num_neighbours=1, num_other=1,
                          heldout_per_head=0))
  c.autoencoder.kind = "identity"
  c.model.name = "DiffusionModelUNet_tiny"
  c.cond.kind = "none"
  c.train.batch_size = 4
  c.train.num_epochs = 0
  c.train.num_steps = 2
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.sample_every_steps = 0
  c.sample.num_inference_steps = 2
  c.generate.num_samples = 1
  c.generate.batch_size = 8
  return c


def test_generation_refuses_other_settings_and_checkpoints(tmp_path):
  c = dm_config()
  wd = str(tmp_path / "run")
  train_diffusion.train(c, wd)
  out = str(tmp_path / "generated")
  first = generate.generate(c, wd, out_dir=out)
  n = len(first["written"])
  assert n == 8 and first["record"]["checkpoint_step"] == 2
  before = snapshot(str(tmp_path))  # the samples and their record beside them
  assert os.path.isfile(out + ".record.json") and "generated.record.json" in before
  again = generate.generate(c, wd, out_dir=out)  # same settings: everything skipped
  assert again["skipped"] == n and not again["written"] and snapshot(str(tmp_path)) == before

  for field, value, message in (("seed", 7, r"seed: 0 -> 7"),
                                ("num_inference_steps", 3, r"num_inference_steps: 2 -> 3")):
    c2 = dm_config()
    (c2.generate if field == "seed" else c2.sample)[field] = value
    with pytest.raises(fileio.InputError, match=rf"other settings \({message}\)"):
      generate.generate(c2, wd, out_dir=out)
    assert snapshot(str(tmp_path)) == before

  # A changed network is refused by the trainer, naming it, config.json untouched.
  wd_before = snapshot(wd, skip=())
  c3 = dm_config()
  c3.model.overrides.norm_num_groups = 4
  with pytest.raises(fileio.InputError, match=r"overrides\.norm_num_groups: '<unset>' -> 4"):
    train_diffusion.train(c3, wd)
  assert snapshot(wd, skip=()) == wd_before

  # Removing the folder, as the refusal advises, is enough: its record beside it describes
  # nothing any more and the next run (other settings) writes the folder and record anew.
  removed = str(tmp_path / "removed")
  generate.generate(c, wd, out_dir=removed)
  shutil.rmtree(removed)
  c4 = dm_config()
  c4.generate.seed = 7
  redo = generate.generate(c4, wd, out_dir=removed)
  assert len(redo["written"]) == n and redo["record"]["seed"] == 7
  with open(removed + ".record.json", encoding="utf-8") as f:
    assert json.load(f)["seed"] == 7

  # Samples without a record (made before records, or by hand) are refused as well.
  os.remove(out + ".record.json")
  with pytest.raises(fileio.InputError, match="no record"):
    generate.generate(c, wd, out_dir=out)
  # A newer checkpoint is another checkpoint_step / weights fingerprint: refused the same way.
  newer = dict(first["record"], checkpoint_step=4, checkpoint="0123")
  assert generate.generation_changes(first["record"], newer) == [
      f"checkpoint: {first['record']['checkpoint']!r} -> '0123'", "checkpoint_step: 2 -> 4"]
  more = dict(first["record"], num_samples=3)  # more samples of the same settings: allowed
  assert generate.generation_changes(first["record"], more) == []
  assert generate.generation_changes(more, first["record"]) == ["num_samples: 3 -> 1"]
