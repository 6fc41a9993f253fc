r"""Runs a job as N JAX processes on this machine: multi-host code paths without a cluster.

Every process gets a coordinator on 127.0.0.1 (a free port), its process id, CPU
collectives (gloo) and K fake CPU devices, so N processes x K devices form one global
N*K-device mesh exactly as N hosts would. The entrypoint reads the settings from the
environment (parallel.initialize_distributed: JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), so any module that calls it runs unchanged:

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/demo.py --workdir=workdirs/demo_2proc
    python launch/local.py --num_processes=2 --module=ldm_jax.main -- --config=...

Everything after `--` goes to `python -m <module>`. The launcher waits for all processes;
if one fails (or --timeout passes) it stops the others and exits with that status; on
Ctrl-C / SIGTERM it stops them all (each child runs in its own process group, and the
whole group is killed, grain workers included).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags, logging

_NPROC = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_NDEV = flags.DEFINE_integer("devices_per_process", 2, "Fake CPU devices per process "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count); 0 keeps "
                             "the platform's real devices.")
_MODULE = flags.DEFINE_string("module", "deepssim_jax.main", "Module run as `python -m`.")
_PLATFORM = flags.DEFINE_string("platform", "cpu", "JAX_PLATFORMS of the children ('' keeps "
                                "the environment's).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")
_LOG_DIR = flags.DEFINE_string("logs", None, "Write each process's output to "
                               "<logs>/process_<i>.log instead of this terminal.")
_TIMEOUT = flags.DEFINE_float("timeout", 0, "Stop everything after this many seconds "
                              "(exit status 124); 0: no limit.")

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict, process_id: int, num_processes: int, port: int,
              devices_per_process: int, platform: str) -> dict:
  """The environment of process `process_id` (see the module docstring)."""
  env = dict(base)
  if devices_per_process:
    xla = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    xla.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(xla)
  if platform:
    env["JAX_PLATFORMS"] = platform
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
  return env


def _die_with_parent() -> None:
  """Runs in each child before exec (Linux): SIGTERM when the launcher dies, even by SIGKILL."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _stop(procs, grace: float = 5.0) -> None:
  """SIGTERM to every child's process group, then SIGKILL to whatever is left."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
      time.sleep(0.05)
  for p in procs:  # reap; a group leader may have left orphans behind in its group
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def launch(args, *, num_processes: int, devices_per_process: int = 2,
           module: str = "deepssim_jax.main", platform: str = "cpu", port: int = 0,
           log_dir=None, timeout: float = 0) -> int:
  """Starts the processes, waits for them, returns the first failure's status (0 if none).

  Args:
    args: arguments for `python -m module`.
    num_processes, devices_per_process, module, platform, port, log_dir, timeout: as the
      flags of the same names.
  """
  port = port or free_port()
  procs, logs = [], []

  def on_signal(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")

  old = signal.signal(signal.SIGTERM, on_signal)
  try:
    for i in range(num_processes):
      env = child_env(os.environ, i, num_processes, port, devices_per_process, platform)
      out = None
      if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        out = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
        logs.append(out)
      procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                    stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True, preexec_fn=_die_with_parent))
    logging.info("Started %d processes of %s (coordinator 127.0.0.1:%d): pids %s",
                 num_processes, module, port, [p.pid for p in procs])
    t0 = time.monotonic()
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, c = failed[0]
        logging.error("process %d exited with status %d: stopping the others", i, c)
        return c if c > 0 else 128 - c  # killed by signal s: 128 + s, as a shell says
      if all(c == 0 for c in codes):
        return 0
      if timeout and time.monotonic() - t0 > timeout:
        logging.error("timeout after %.0f s: stopping all processes", timeout)
        return 124
      time.sleep(0.1)
  except KeyboardInterrupt:
    logging.error("interrupted: stopping all processes")
    return 130
  finally:
    _stop(procs)
    for f in logs:
      f.close()
    signal.signal(signal.SIGTERM, old)


def main(argv):
  sys.exit(launch(argv[1:], num_processes=_NPROC.value,
                  devices_per_process=_NDEV.value, module=_MODULE.value,
                  platform=_PLATFORM.value, port=_PORT.value, log_dir=_LOG_DIR.value,
                  timeout=_TIMEOUT.value))


if __name__ == "__main__":
  app.run(main)
