"""Multi-process runs equal single-process ones: 2 processes x 2 CPU devices vs 1 x 4.

The 2-process runs go through launch/local.py (coordinator on 127.0.0.1, gloo CPU
collectives, 2 fake devices per process) with configs/tiny_multihost.py; the reference is
this pytest process (1 process, the 4 fake devices of conftest) running the same jobs on
the same global batches. Each launch has a time limit, and every child process group is
killed however the test ends.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepssim_jax import fileio, jobs, pairs as pairs_lib, parallel, store, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_multihost.py")
LAUNCH_TIMEOUT = 300  # seconds per launch; a run takes ~1-2 min on 2 busy CPU cores


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_multihost", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def launch(args, logs: str, num_processes: int = 2, devices_per_process: int = 2) -> dict:
  """Runs `python -m deepssim_jax.main ARGS` as N processes; returns {log name: text}.

  The children inherit this test process's XLA_FLAGS (so the same XLA options), except the
  device count, which the launcher sets.
  """
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"),
         f"--num_processes={num_processes}", f"--devices_per_process={devices_per_process}",
         f"--logs={logs}", f"--timeout={LAUNCH_TIMEOUT}", "--", f"--config={CONFIG}", *args]
  env = dict(os.environ,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT + 30)
  finally:  # the launcher stops its children on SIGTERM; then make sure of it
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(10)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  logs_text = {}
  for f in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
    with open(os.path.join(logs, f), errors="replace") as fh:
      logs_text[f] = fh.read()
  if proc.returncode:
    tails = "\n".join(f"--- {f}\n{t[-3000:]}" for f, t in logs_text.items())
    pytest.fail(f"launch failed ({proc.returncode}): {out.decode()[-2000:]}\n{tails}")
  assert sorted(logs_text) == [f"process_{i}.log" for i in range(num_processes)]
  return logs_text


def _flat_json(path: str) -> dict:
  def flat(x, prefix=""):
    if isinstance(x, dict):
      return {k2: v for k, y in x.items() for k2, v in flat(y, f"{prefix}/{k}").items()}
    if isinstance(x, list):
      return {k2: v for i, y in enumerate(x) for k2, v in flat(y, f"{prefix}/{i}").items()}
    return {prefix: x}
  with open(path) as f:
    return flat(json.load(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Trains (and evaluates) the tiny config as 1 process x 4 devices and as 2 x 2."""
  tmp = tmp_path_factory.mktemp("multihost")
  one, two = str(tmp / "one"), str(tmp / "two")
  out = jobs.train_job(tiny_config(), one)
  logs = launch([f"--workdir={two}", "--mode=train"], str(tmp / "logs_train"))
  return {"tmp": tmp, "one": one, "two": two, "out_one": out, "logs": logs}


def test_two_processes_train_like_one(runs):
  one, two = runs["one"], runs["two"]
  # The pair table (SSIM targets computed across processes) is the same, written once.
  t1, t2 = pairs_lib.read_pairs(os.path.join(one, "pairs.csv")), \
      pairs_lib.read_pairs(os.path.join(two, "pairs.csv"))
  np.testing.assert_array_equal(t1.real_key, t2.real_key)
  np.testing.assert_array_equal(t1.synth_key, t2.synth_key)
  np.testing.assert_allclose(t1.ssim, t2.ssim, rtol=1e-6, atol=1e-6)
  # Step by step the same losses (metrics.csv is written by process 0 alone: no duplicates).
  cols = ["step", "loss", "grad_norm", "val_loss"]
  m1 = fileio.read_csv(os.path.join(one, "metrics.csv"), required=cols)
  m2 = fileio.read_csv(os.path.join(two, "metrics.csv"), required=cols)
  steps = runs["out_one"]["step"]
  assert [int(s) for s in m1["step"]] == [int(s) for s in m2["step"]] == \
      list(range(1, steps + 1))
  for c in ("loss", "grad_norm"):
    np.testing.assert_allclose(np.float64(m2[c]), np.float64(m1[c]), rtol=1e-5, atol=1e-6,
                               err_msg=c)
  v1 = [float(v) for v in m1["val_loss"] if v]
  v2 = [float(v) for v in m2["val_loss"] if v]
  assert len(v1) == len(v2) >= 2  # every epoch and at the end
  np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6)
  # Logs and progress come from process 0 only.
  log0, log1 = runs["logs"]["process_0.log"], runs["logs"]["process_1.log"]
  assert "validation: MSE" in log0 and "train:" in log0
  assert "validation: MSE" not in log1 and "train:" not in log1
  # Each process announces itself; after that process 1 logs warnings only.
  assert "process 0 of 2, 2 local / 4 global devices" in log0
  assert "process 1 of 2, 2 local / 4 global devices" in log1
  assert "Pairs: " in log0 and "Pairs:" not in log1
  # The evaluation (DeepSSIM embeddings and SSIM of the labelled test pairs, computed
  # across processes) gives the same results, written by process 0.
  r1, r2 = (_flat_json(os.path.join(w, "eval", "results.json")) for w in (one, two))
  assert sorted(r1) == sorted(r2) and any("deepssim" in k for k in r1)
  for k in r1:
    if isinstance(r1[k], float) or isinstance(r2[k], float):
      assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), k
    else:
      assert r2[k] == r1[k], k


def test_two_process_checkpoint_restores_in_one_process(runs):
  """The 2-process run's checkpoints (latest: full train state, best: model) restore here,
  on 4 devices and on 1, with the parameters of the 1-process run."""
  one_dev = parallel.make_mesh(jax.devices()[:1])
  for which, mesh in (("latest", None), ("latest", one_dev), ("best", one_dev)):
    _, variables, step = train.restore_model(runs["two"], which, mesh=mesh)
    _, ref_vars, ref_step = train.restore_model(runs["one"], which, mesh=mesh)
    assert step == ref_step and (which == "best" or step == runs["out_one"]["step"])
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ref_vars)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_two_process_embedding_store_equals_one_process(runs):
  """Both processes embed their rows of each batch; process 0 writes the store."""
  tmp, one = runs["tmp"], runs["one"]
  config = tiny_config()
  overrides = dict(checkpoint=f"{one}:best", batch_size=4, shard_rows=10, num_threads=1)
  config.embed.update(overrides, dir=str(tmp / "stores_one"))
  jobs.embed_job(config, one)
  args = [f"--config.embed.{k}={v}" for k, v in overrides.items()]
  launch([f"--workdir={one}", "--mode=embed", f"--config.embed.dir={tmp / 'stores_two'}",
          *args], str(tmp / "logs_embed"))
  for name in config.embed.sets:
    ids1, e1 = store.load_store(str(tmp / "stores_one" / name))
    ids2, e2 = store.load_store(str(tmp / "stores_two" / name))
    assert len(ids1) > 10  # shards of 3 batches (the last one padded), several shards
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-6)
    i1, i2 = store.read_index(str(tmp / "stores_one" / name)), \
        store.read_index(str(tmp / "stores_two" / name))
    assert [s["file"] for s in i1["shards"]] == [s["file"] for s in i2["shards"]]


def test_launcher_propagates_failure_and_stops_the_others(tmp_path):
  """Process 1 fails at once while process 0 would sleep for minutes: the launcher exits
  with process 1's status within seconds, and process 0 (and its own child) are gone."""
  (tmp_path / "sleeper.py").write_text(
      "import os, subprocess, sys, time\n"
      "pid = int(os.environ['JAX_PROCESS_ID'])\n"
      "assert os.environ['JAX_NUM_PROCESSES'] == '2'\n"
      "assert os.environ['JAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:')\n"
      "assert '--xla_force_host_platform_device_count=3' in os.environ['XLA_FLAGS']\n"
      "if pid == 1:  # fail once process 0 and its child run\n"
      f"  while not os.path.exists(r'{tmp_path}/pids'): time.sleep(0.05)\n"
      "  sys.exit(3)\n"
      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
      f"open(r'{tmp_path}/pids.tmp', 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
      f"os.replace(r'{tmp_path}/pids.tmp', r'{tmp_path}/pids')\n"
      "time.sleep(300)\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
         "--devices_per_process=3", "--module=sleeper", "--timeout=60"]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=90, capture_output=True)
  assert proc.returncode == 3, proc.stderr.decode()[-2000:]
  pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
  for pid in pids:
    try:
      os.kill(pid, 0)
      alive = not open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    except (ProcessLookupError, FileNotFoundError):
      alive = False
    assert not alive, f"process {pid} survived the launcher"
