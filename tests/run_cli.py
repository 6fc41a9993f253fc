"""Runs an entrypoint as a user does: a subprocess at the repository root, without
conftest's 4 fake devices and LLVM -O0 (real training loops run ~3x faster), sharing the
tests' persistent compilation cache."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run(module: str, config: str, workdir: str, *args: str, timeout: int = 900) -> str:
  """`python -m <module> --config=<config> --workdir=<workdir> <args>`; its stdout.
  Fails the test with the end of stderr when the command fails."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}", *args]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout
