"""The headline cases of "no silent wrong answers", through the real CLI on one workdir:
a killed embed followed by an audit with other store settings, and reruns refused for a
changed model or pair setting, leaving the workdir as it was."""

import hashlib
import json
import os
import subprocess
import sys

import run_cli  # tests/run_cli.py (pytest puts tests/ on sys.path)

CONFIG = "configs/tiny_multihost.py"


def cli(workdir, *args, env=None):
  """(exit status, stdout, stderr) of `python -m deepssim_jax.main` on the tiny config."""
  e = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=os.path.join(run_cli.ROOT, ".jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **(env or {}))
  out = subprocess.run([sys.executable, "-m", "deepssim_jax.main", f"--config={CONFIG}",
                        f"--workdir={workdir}", *args], cwd=run_cli.ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
  return out.returncode, out.stdout, out.stderr


def snapshot(folder):
  """{relative path: sha256} of every file under folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_killed_embed_then_audit_and_refused_reruns(tmp_path):
  wd = str(tmp_path / "run")
  rc, _, err = cli(wd)  # train (2 epochs) and evaluate
  assert rc == 0, err[-2000:]

  # A rerun refused for a changed model or pair setting writes nothing.
  before = snapshot(wd)
  for override, named in (("--config.model.overrides.embed_dim=32", "embed_dim"),
                          ("--config.pairs.num_pairs=40", "num_pairs")):
    rc, _, err = cli(wd, override)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and named in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert snapshot(wd) == before, override

  # embed killed after 2 shards of 4 rows; the audit (default shard_rows) must not use the
  # partial store as if complete: it rebuilds it and audits every training image.
  rc, _, err = cli(wd, "--mode=embed", "--config.embed.shard_rows=4",
                   "--config.embed.batch_size=4", env={"DEEPSSIM_STOP_AFTER_SHARDS": "2"})
  assert rc == 3, err[-2000:]
  with open(os.path.join(wd, "stores", "real", "index.json")) as f:
    index = json.load(f)
  assert index["status"] != "complete"
  rc, _, err = cli(wd, "--mode=audit", "--config.calibrate.dar.enabled=False")
  assert rc == 0, err[-2000:]
  with open(os.path.join(wd, "stores", "real", "index.json")) as f:
    index = json.load(f)
  with open(os.path.join(wd, "audit", "summary.json")) as f:
    summary = json.load(f)
  assert index["status"] == "complete"
  assert index["n_rows"] == index["meta"]["n_source"] == summary["n_training"]
  assert summary["n_training"] > 8  # more than the two killed shards held
