"""No silent wrong answers (issue 12): the workdir lock, one-line errors, config checks up
front and the cleaning of killed jobs' temporaries.

The entrypoints run as users run them (subprocesses: exit status, stderr) four times, all
started at once by one module fixture (JAX's start-up dominates them; every one stops before
any heavy work). The rest runs in this process: the lock and the cleaning
(deepssim_jax.workdir), the error reporting (deepssim_jax.cli), the checks
(deepssim_jax.validate) and ldm_jax.main's wiring with a stand-in job.
"""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from deepssim_jax import cli, fileio, validate, workdir as workdir_lib

import run_cli  # tests/run_cli.py (pytest puts tests/ on sys.path)

ROOT = run_cli.ROOT
TINY = "configs/tiny_multihost.py"
LDM_AE = "configs/ldm_demo_autoencoder.py"


def load_config(rel: str):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(rel)[:-3],
                                                os.path.join(ROOT, rel))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def snapshot(folder: str) -> dict:
  """{relative path: (is folder, size, mtime_ns)} of everything under folder."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.lstat(p)
      out[os.path.relpath(p, folder)] = (os.path.isdir(p), st.st_size, st.st_mtime_ns)
  return out


def make_leftovers(wd: str) -> tuple[list[str], list[str]]:
  """Temporaries a killed job leaves (to be removed) and look-alikes (to be kept)."""
  temps = [".audit.k2j_45zq", ".audit.ab12cd34.old",
           "checkpoints/latest/7.orbax-checkpoint-tmp-1712345678",
           "checkpoints/best/3/state.orbax-checkpoint-tmp-99",
           "eval/.results.json.x8y7z6w5.tmp", ".pairs.csv.abcdefgh.tmp"]
  keep = ["checkpoints/latest/5/state/data.bin", "checkpoints/best/3/data.bin",
          "audit/summary.json", "notes.tmp", ".a.b.tmp", ".jax_cache/x", ".cache/y",
          "eval/results.json"]
  for rel in temps:
    p = os.path.join(wd, rel)
    if rel.endswith(".tmp"):
      os.makedirs(os.path.dirname(p), exist_ok=True)
      with open(p, "w") as f:
        f.write("partial")
    else:
      os.makedirs(p)
      with open(os.path.join(p, "part"), "w") as f:
        f.write("partial")
  for rel in keep:
    p = os.path.join(wd, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
      f.write("kept")
  return temps, keep


def dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def write_lock(wd: str, **info) -> dict:
  info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-05-01T10:00:00",
          "mode": "train", **info}
  fileio.write_json(os.path.join(wd, workdir_lib.LOCK_NAME), info)
  return info


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- the CLI

def _start(module: str, config: str, wd: str, *args: str) -> subprocess.Popen:
  """`python -m <module>` as run_cli.run starts it (without DEEPSSIM_VERBOSE)."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop(cli.VERBOSE_ENV, None)
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={wd}", *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Four entrypoint runs started at once; {name: (returncode, stderr, facts)}."""
  base = tmp_path_factory.mktemp("cli")
  busy = str(base / "busy")
  os.makedirs(busy)
  make_leftovers(busy)
  lock = workdir_lib.WorkdirLock(busy, "train").acquire()  # a live job: this process
  before = snapshot(busy)
  runs = {
      "busy": _start("deepssim_jax.main", TINY, busy),
      "log_every": _start("deepssim_jax.main", TINY, str(base / "log_every"),
                          "--config.train.log_every_steps=0"),
      "epochs_verbose": _start("deepssim_jax.main", TINY, str(base / "epochs"),
                               "--config.train.num_epochs=0", "--verbose"),
      "ldm_ckpt": _start("ldm_jax.main", LDM_AE, str(base / "ldm"),
                         "--config.train.checkpoint_every_steps=0"),
  }
  out = {}
  try:
    for name, p in runs.items():
      _, err = p.communicate(timeout=300)
      out[name] = (p.returncode, err)
  finally:
    for p in runs.values():
      if p.poll() is None:
        p.kill()
    after = snapshot(busy)
    lock.release()
  out["facts"] = {"busy": busy, "before": before, "after": after, "base": str(base),
                  "pid": os.getpid()}
  return out


def test_second_job_on_a_locked_workdir_is_refused(cli_runs):
  rc, err = cli_runs["busy"]
  facts = cli_runs["facts"]
  assert rc == 2, err[-2000:]
  assert "Traceback" not in err
  lines = error_lines(err)
  assert len(lines) == 1, err
  assert lines[0].startswith(f"error: {facts['busy']} is in use by PID {facts['pid']} on "
                             f"{socket.gethostname()} since ")
  assert "(mode train)" in lines[0]
  # Nothing changed: not the lock, not the live job's temporaries, no new file.
  assert facts["after"] == facts["before"]


def test_zero_log_interval_refused_before_anything_is_written(cli_runs):
  rc, err = cli_runs["log_every"]
  assert rc == 2, err[-2000:]
  assert "Traceback" not in err
  assert error_lines(err) == ["error: config.train.log_every_steps must be >= 1, got 0"]
  assert not os.path.exists(os.path.join(cli_runs["facts"]["base"], "log_every"))


def test_zero_epochs_with_verbose_shows_the_traceback(cli_runs):
  rc, err = cli_runs["epochs_verbose"]
  assert rc == 2, err[-2000:]
  assert "Traceback (most recent call last)" in err and "ConfigError" in err
  assert error_lines(err) == ["error: config.train.num_epochs must be >= 1, got 0"]
  assert not os.path.exists(os.path.join(cli_runs["facts"]["base"], "epochs"))


def test_ldm_zero_checkpoint_interval_refused(cli_runs):
  rc, err = cli_runs["ldm_ckpt"]
  assert rc == 2, err[-2000:]
  assert "Traceback" not in err
  assert error_lines(err) == ["error: config.train.checkpoint_every_steps must be >= 1, got 0"]
  assert not os.path.exists(os.path.join(cli_runs["facts"]["base"], "ldm"))


# ----------------------------------------------------------------------------- the lock

def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
  wd = str(tmp_path / "run")
  path = os.path.join(wd, workdir_lib.LOCK_NAME)
  with workdir_lib.WorkdirLock(wd, "embed") as lock:
    info = workdir_lib.read_lock(path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["mode"] == "embed" and info["started"]
    with pytest.raises(workdir_lib.WorkdirInUse, match=f"in use by PID {os.getpid()} on "):
      workdir_lib.WorkdirLock(wd, "train").acquire()
    assert workdir_lib.read_lock(path) == lock.info  # the refused job left it alone
  assert not os.path.exists(path)
  # Released on an exception too.
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lib.WorkdirLock(wd, "train"):
      raise RuntimeError("boom")
  assert not os.path.exists(path)


def test_stale_locks_are_taken_over_and_logged(tmp_path, caplog):
  wd = str(tmp_path)
  path = os.path.join(wd, workdir_lib.LOCK_NAME)
  pid = dead_pid()
  write_lock(wd, pid=pid)
  with caplog.at_level("WARNING"):
    lock = workdir_lib.WorkdirLock(wd, "train").acquire()
  assert lock.took_over["pid"] == pid
  assert f"took over a stale lock (PID {pid} is no longer running)" in caplog.text
  assert workdir_lib.read_lock(path)["pid"] == os.getpid()
  lock.release()
  # A live PID that another process now has (its start time differs): stale as well.
  write_lock(wd, proc_start="1")
  with workdir_lib.WorkdirLock(wd, "train") as lock:
    assert lock.took_over["proc_start"] == "1"
  # Another host's lock cannot be checked: refused, kept, with what to do.
  write_lock(wd, pid=pid, host="elsewhere.example")
  before = snapshot(wd)
  with pytest.raises(workdir_lib.WorkdirInUse, match=f"on elsewhere.example .* remove {path}"):
    workdir_lib.WorkdirLock(wd, "train").acquire()
  assert snapshot(wd) == before
  # An unreadable lock file: refused after a short wait.
  with open(path, "w"):
    pass
  with pytest.raises(workdir_lib.WorkdirInUse, match="cannot be read"):
    workdir_lib.WorkdirLock(wd, "train").acquire(wait_s=0.2)


# ----------------------------------------------------------------------------- temporaries

def test_leftover_temporaries_removed_at_start_not_under_a_live_job(tmp_path, caplog):
  wd = str(tmp_path / "run")
  temps, keep = make_leftovers(wd)
  assert workdir_lib.temporaries(wd) == sorted(os.path.join(wd, t) for t in temps)
  # A live job holds the workdir: a second start is refused and removes nothing.
  live = workdir_lib.WorkdirLock(wd, "audit").acquire()
  before = snapshot(wd)
  with pytest.raises(workdir_lib.WorkdirInUse):
    with workdir_lib.locked(wd, "train"):
      pass
  assert snapshot(wd) == before
  live.release()
  # The next start: removed (and logged) while holding the lock, look-alikes kept.
  with caplog.at_level("WARNING"):
    with workdir_lib.locked(wd, "train") as lock:
      assert lock.held and os.path.exists(os.path.join(wd, workdir_lib.LOCK_NAME))
      for t in temps:
        assert not os.path.exists(os.path.join(wd, t)), t
  for t in temps:
    assert f"Removed {os.path.join(wd, t)}, left by an interrupted job" in caplog.text
  for k in keep:
    assert os.path.exists(os.path.join(wd, k)), k
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_NAME))


# ----------------------------------------------------------------------------- errors

def _guarded_start(wd: str, verbose: bool = False):
  def body():
    with workdir_lib.locked(wd, "train"):
      raise AssertionError("the job must not start")
  return cli.run_guarded(body, verbose=verbose)


def test_unwritable_workdir_is_one_line(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  cases = [(str(blocker / "run"), "not a directory")]  # works as root too
  if os.geteuid() != 0:  # chmod does not stop root
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    cases.append((str(ro), "permission denied"))
  for wd, what in cases:
    with pytest.raises(SystemExit) as e:
      _guarded_start(wd)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: {wd}") and what in lines[0], err
    assert len(lines) == 2 and lines[1].startswith("hint: "), err


def test_verbose_shows_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
  def bad_input():
    raise fileio.InputError("pairs.csv: line 3: not a number")
  with pytest.raises(SystemExit) as e:
    cli.run_guarded(bad_input, verbose=cli.verbose_requested(False))
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: pairs.csv: line 3: not a number\n"
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  with pytest.raises(SystemExit):
    cli.run_guarded(bad_input, verbose=cli.verbose_requested(False))
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err
  assert err.endswith("error: pairs.csv: line 3: not a number\n")
  # SystemExit(message) (config_lib.require_path) is a user error; a bug is not.
  with pytest.raises(SystemExit) as e:
    cli.run_guarded(lambda: (_ for _ in ()).throw(SystemExit("images: /x does not exist.")))
  assert e.value.code == 2
  with pytest.raises(ZeroDivisionError):
    cli.run_guarded(lambda: 1 // 0)


# ----------------------------------------------------------------------------- config checks

@pytest.mark.parametrize("key,value,message", [
    ("train.log_every_steps", 0, "config.train.log_every_steps must be >= 1, got 0"),
    ("train.num_epochs", 0, "config.train.num_epochs must be >= 1, got 0"),
    ("train.batch_size", 0, "config.train.batch_size must be >= 1, got 0"),
    ("train.eval_every_steps", -1, "config.train.eval_every_steps must be >= 0, got -1"),
    ("embed.batch_size", 0, "config.embed.batch_size must be >= 1, got 0"),
    ("embed.shard_rows", 0, "config.embed.shard_rows must be >= 1, got 0"),
    ("pairs.num_pairs", 0, "config.pairs.num_pairs must be >= 1, got 0"),
    ("match.k", 0, "config.match.k must be >= 1, got 0"),
    ("pairs.valid_fraction", 1.5, "config.pairs.valid_fraction must be in [0, 1), got 1.5"),
    ("train.batch_size", 6, "config.train.batch_size must be a multiple of the 4 devices"),
    ("aug.p_blur", 1.5, "config.aug.p_blur must be in [0, 1], got 1.5"),
    ("explain.method", "gradcam",
     "config.explain.method must be one of ['occlusion', 'layercam'], got 'gradcam'"),
    ("explain.scores", ("similar",), "config.explain.scores must be a tuple of ['similarity', "
     "'dissimilarity'], got ('similar',)"),
    ("explain.window", 0, "config.explain.window must be >= 1, got 0"),
    ("aug.blur_min_sigma", 0.0, "config.aug.blur_min_sigma must be > 0, got 0.0"),
    ("aug.blur_max_sigma", 0.2, "config.aug.blur_max_sigma must be >= config.aug.blur_min_sigma"
     " (0.5), got 0.2"),
    ("aug.p_elastic", -0.1, "config.aug.p_elastic must be in [0, 1], got -0.1"),
    ("aug.elastic_grid", 1, "config.aug.elastic_grid must be >= 2, got 1"),
    ("aug.elastic_max_disp", -1.0, "config.aug.elastic_max_disp must be >= 0, got -1.0"),
    ("aug.p_noise", 2.0, "config.aug.p_noise must be in [0, 1], got 2.0"),
    ("aug.noise_min_sigma", -0.1, "config.aug.noise_min_sigma must be >= 0, got -0.1"),
    ("aug.noise_max_sigma", -0.05, "config.aug.noise_max_sigma must be >= "
     "config.aug.noise_min_sigma (0), got -0.05"),
])
def test_deepssim_config_checks(key, value, message):
  config = load_config(TINY)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(validate.ConfigError, match=message.replace("(", r"\(")
                     .replace(")", r"\)").replace("[", r"\[")):
    validate.check_deepssim(config, "train", num_devices=4)


def test_documented_zero_meanings_are_kept():
  config = load_config(TINY)
  config.train.eval_every_steps = 0  # once per epoch
  config.train.checkpoint_every_steps = 0  # at every evaluation
  validate.check_deepssim(config, "train", num_devices=4)
  ae = load_config(LDM_AE)  # num_epochs 0 with num_steps set, sample_every_steps 0
  ae.train.sample_every_steps = 0
  assert ae.train.num_epochs == 0 and ae.train.num_steps > 0
  validate.check_ldm(ae, "autoencoder", num_devices=4)
  for rel in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if rel.endswith(".py"):
      c = load_config(os.path.join("configs", rel))
      check = validate.check_ldm if rel.startswith("ldm_") else validate.check_deepssim
      check(c, c.get("mode", "train"), num_devices=4)


def test_ldm_config_checks():
  ae = load_config(LDM_AE)
  ae.train.log_every_steps = 0
  ae.train.checkpoint_every_steps = 0
  ae.train.num_steps = 0
  ae.train.effective_batch_size = ae.train.batch_size + 1
  with pytest.raises(validate.ConfigError) as e:
    validate.check_ldm(ae, "autoencoder")
  msg = str(e.value)
  for part in ("config.train.log_every_steps must be >= 1, got 0",
               "config.train.checkpoint_every_steps must be >= 1, got 0",
               "config.train.num_epochs must be >= 1 when config.train.num_steps is 0",
               "config.train.effective_batch_size must be a multiple of"):
    assert part in msg
  assert "\n" not in msg
  dm = load_config("configs/ldm_demo_diffusion.py")
  dm.data.intensity = "percentile"
  dm.data.valid_fraction = 1.0
  dm.latent.pad_mode = "centre"
  dm.cond.kind = "text"
  dm.autoencoder.checkpoint = "first"
  dm.train.ema_decay = 1.5
  with pytest.raises(validate.ConfigError) as e:
    validate.check_ldm(dm, "diffusion")
  msg = str(e.value)
  for part in ("config.data.intensity must be one of ['zscore', 'minmax'], got 'percentile'",
               "config.data.valid_fraction must be in [0, 1), got 1.0",
               "config.latent.pad_mode must be one of ['end', 'symmetric'], got 'centre'",
               "config.data.text_csv must name a CSV",
               "config.autoencoder.checkpoint must be one of ['latest', 'best'], got 'first'",
               "config.train.ema_decay must be in [0, 1), got 1.5"):
    assert part in msg


# ----------------------------------------------------------------------------- ldm_jax.main

@pytest.fixture
def ldm_main():
  """ldm_jax.main (its flags are defined once per process; test_ldm_train imports it too)
  with flags restored after the test."""
  from ldm_jax import main  # pylint: disable=g-import-not-at-top
  with flagsaver.flagsaver():
    yield main


def test_ldm_main_locks_cleans_and_reports(ldm_main, monkeypatch, tmp_path, capsys, caplog):
  wd = str(tmp_path / "ae")
  temps, _ = make_leftovers(wd)
  seen = {}

  def job(config, workdir):
    seen["lock"] = workdir_lib.read_lock(os.path.join(workdir, workdir_lib.LOCK_NAME))
    seen["temps"] = workdir_lib.temporaries(workdir)
    if config.train.log_every_steps == 7:
      raise fileio.InputError("bad images")

  monkeypatch.setitem(ldm_main.MODES, "autoencoder", job)
  argv = ["ldm_jax.main", f"--config={os.path.join(ROOT, LDM_AE)}", f"--workdir={wd}"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv
  flags.FLAGS(argv)
  with caplog.at_level("WARNING"):
    ldm_main.main([])
  assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["mode"] == "autoencoder"
  assert seen["temps"] == []
  assert all(os.path.join(wd, t) in caplog.text for t in temps)
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_NAME))
  # A user error inside the job: one line, status 2, the lock released.
  argv.append("--config.train.log_every_steps=7")
  flags.FLAGS(argv)
  with pytest.raises(SystemExit) as e:
    ldm_main.main([])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: bad images\n"
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_NAME))
