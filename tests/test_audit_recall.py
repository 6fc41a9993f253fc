"""The audit on the embedded data, with known answers: configs/audit_demo.py trained from
scratch and audited through the command line (about three minutes on 2 cores). It flags the
augmented copies of training slices and neither the neighbouring slices of the training
heads nor the slices of an unseen head.

The CLI runs in a subprocess without conftest's 4 fake devices and LLVM -O0 (which make
real training several times slower), as the user runs it.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from deepssim_jax import banks, fileio
import run_cli  # tests/run_cli.py (pytest puts tests/ on sys.path)

CONFIG = os.path.join(run_cli.ROOT, "configs", "audit_demo.py")


def load_config():
  spec = importlib.util.spec_from_file_location("audit_demo", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _cli(workdir, *args):
  return run_cli.run("deepssim_jax.main", "configs/audit_demo.py", workdir, *args)


def test_audit_flags_augmented_copies_and_not_neighbours_or_other_heads(tmp_path):
  c = load_config()
  wd = str(tmp_path / "run")
  _cli(wd)
  assert "Duplicate" in _cli(wd, "--mode=audit")

  rows = fileio.read_csv(os.path.join(wd, "audit", "audit.csv"),
                     ["synth_id", "train_id_1", "class"])
  synth = banks.bank(c.data.synth, c, os.path.join(wd, "data"), "synth")
  meta = {k: dict(zip(synth["keys"].tolist(), np.asarray(v).tolist()))
          for k, v in synth["meta"].items()}
  ids = rows["synth_id"]
  kind = np.array([meta["kind"][s] for s in ids])
  aug = np.array([meta["augment"][s] for s in ids])
  flagged = np.array([int(x) == 1 for x in rows["class"]])  # Duplicate at t_high = 0.85
  assert sorted(set(kind)) == ["copy", "neighbour", "other"]

  copy = kind == "copy"
  geometric = copy & np.array(["flip" in a or "rot" in a for a in aug])
  assert geometric.sum() >= 100  # most copies are flipped and/or rotated
  assert flagged[geometric].mean() >= 0.9, flagged[geometric].mean()
  assert flagged[copy].mean() >= 0.9, flagged[copy].mean()
  # A flagged copy is matched to the very slice it was made from.
  src = np.array([meta["source_key"][s] for s in ids])
  top1 = np.asarray(rows["train_id_1"])
  assert np.mean(top1[copy & flagged] == src[copy & flagged]) >= 0.9

  # Neighbouring slices (true aligned SSIM about 0.4-0.65) and the unseen head are not.
  assert flagged[kind == "neighbour"].mean() <= 0.05, flagged[kind == "neighbour"].mean()
  assert flagged[kind == "other"].mean() <= 0.05, flagged[kind == "other"].mean()

  with open(os.path.join(wd, "audit", "summary.json")) as f:
    summary = json.load(f)
  assert summary["memorization_rate"] == pytest.approx(np.mean(flagged))
  # The audit's own check against the demo's labels says the same.
  v = summary["validation"]["rules"]["paper"]
  assert v["recall"] == pytest.approx(flagged[copy].mean())
  assert v["fp"] == int(flagged[~copy].sum())
