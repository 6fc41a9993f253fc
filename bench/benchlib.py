"""Shared pieces of the side-by-side benchmarks: the row every script prints, the same-run
matmul anchor, and a library side (torch, MONAI, scikit-image) run in its own process.

Every benchmark measures our implementation and the library it replaces in the same run, on
the same inputs, with repetitions interleaved (the machines are shared and noisy), and
reports medians. Nothing here holds a measured figure.

A row (one per measured work, a dict, also what `--json=PATH` writes):
  work              what is measured (same for both sides)
  ours, theirs      median seconds per call and items per call (the two sides may do a
                    different number of items per call: their rates are compared)
  unit              the items ("img", "pairs", "steps", "samples")
  theirs_impl       the library side, e.g. "torch 2.x eager (torchvision convnext_base)"
  ratio             ours as a share of their speed: their time / our time per item (> 1:
                    ours is faster)
  ours_fraction     our achieved FLOP/s over the float32 matmul FLOP/s measured in the same
                    run (None where the work has no FLOP count), theirs_fraction the same for
                    theirs with the same FLOP count
  matmul_gflops     that matmul rate (median over the repetitions)

The library side runs in a worker process (`Worker`): it reads its own thread settings and
allocator at start-up, and the parent asks it for one timed repetition at a time, so its
repetitions interleave with ours. `serve` is the worker's loop.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def cores() -> int:
  """CPU cores this process may run on: XLA:CPU sizes its intra-op pool to this, and the
  torch side is given the same number of threads."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def add_args(ap) -> None:
  """--quick and --json, which every benchmark script takes."""
  ap.add_argument("--quick", action="store_true",
                  help="tiny sizes and few repetitions: a smoke run, not a measurement")
  ap.add_argument("--json", default=None, help="also write the rows (and the run's facts) "
                  "as JSON to this path (bench/run_all.py collects them)")


def median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


class MatmulAnchor:
  """A jitted float32 n x n jnp matmul (2 n^3 FLOPs): the machine's dense FLOP rate, timed
  just before each repetition of the work it anchors."""

  def __init__(self, n: int = 2048):
    import jax
    import jax.numpy as jnp
    self._jax = jax
    self.n = n
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    self._f = jax.jit(lambda x, y: x @ y)
    self._args = (a, a)
    jax.block_until_ready(self._f(*self._args))
    self.seconds = []

  def time(self) -> float:
    t = time.perf_counter()
    self._jax.block_until_ready(self._f(*self._args))
    self.seconds.append(time.perf_counter() - t)
    return self.seconds[-1]

  def gflops(self) -> float:
    """Median GFLOP/s over every call so far."""
    if not self.seconds:
      self.time()
    return 2.0 * self.n ** 3 / median(self.seconds) / 1e9


def interleave(fns: dict, reps: int, anchor: MatmulAnchor = None, warmup: bool = True) -> dict:
  """Times each of fns (name -> zero-argument callable that blocks until done) `reps` times,
  round robin, the matmul anchor before each round; returns name -> list of seconds. A
  callable with `self_timed = True` returns the seconds it measured itself (a worker's
  call: the round trip to the worker is excluded)."""
  if warmup:
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    if anchor is not None:
      anchor.time()
    for name, fn in fns.items():
      t = time.perf_counter()
      out = fn()
      times[name].append(float(out) if getattr(fn, "self_timed", False)
                         else time.perf_counter() - t)
  return times


def row(work: str, ours_s: float, theirs_s: float, theirs_impl: str, unit: str,
        ours_items: float = 1, theirs_items: float = None, flops_per_item: float = None,
        matmul_gflops: float = None, note: str = "") -> dict:
  """One result row (module docstring). *_s: median seconds per call; *_items: items per
  call (theirs defaults to ours); flops_per_item: FLOPs of one item, for the fractions."""
  theirs_items = ours_items if theirs_items is None else theirs_items
  ours_rate, theirs_rate = ours_items / ours_s, theirs_items / theirs_s
  frac = lambda rate: (None if flops_per_item is None or not matmul_gflops
                       else rate * flops_per_item / 1e9 / matmul_gflops)
  return {"work": work, "unit": unit, "ours_s": ours_s, "ours_items": ours_items,
          "theirs_s": theirs_s, "theirs_items": theirs_items, "theirs_impl": theirs_impl,
          "ratio": ours_rate / theirs_rate, "ours_fraction": frac(ours_rate),
          "theirs_fraction": frac(theirs_rate), "flops_per_item": flops_per_item,
          "matmul_gflops": matmul_gflops, "note": note}


def fmt_side(seconds: float, items: float, unit: str) -> str:
  """'62.5 img/s (0.512 s per 32)', or '12.3 s' for one item."""
  if items == 1:
    return f"{seconds:.3g} s"
  rate = items / seconds
  rate_s = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
  return f"{rate_s} {unit}/s ({seconds:.3g} s per {items:,g})"


def fmt_pct(x) -> str:
  if x is None:
    return "-"
  return f"{100 * x:.0f}%" if x >= 0.01 else f"{100 * x:.2f}%"


HEADER = ("| work | ours | theirs | theirs is | ratio (their time / ours) | "
          "ours: share of matmul FLOP/s | theirs: share |\n|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
  work = r["work"] + (f" ({r['note']})" if r.get("note") else "")
  return (f"| {work} | {fmt_side(r['ours_s'], r['ours_items'], r['unit'])} | "
          f"{fmt_side(r['theirs_s'], r['theirs_items'], r['unit'])} | {r['theirs_impl']} | "
          f"**{r['ratio']:.2f}** | {fmt_pct(r['ours_fraction'])} | "
          f"{fmt_pct(r['theirs_fraction'])} |")


def _cpuinfo() -> tuple:
  """(first value of each /proc/cpuinfo field, the CPU's flags), or None without the file."""
  fields, flags = {}, set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        fields.setdefault(key, value.strip())
        if key in ("flags", "Features"):
          flags |= set(value.split())
  except OSError:
    return None
  return fields, flags


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what platform knows."""
  info = _cpuinfo()
  name = info and info[0].get("model name")
  return name or platform.processor() or platform.machine()


SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
              "asimd", "sve")
CPU_ID_FIELDS = ("cpu family", "model", "stepping", "CPU implementer", "CPU part")


def cpu_id() -> str:
  """The CPU's family / model / stepping and its vector extensions (/proc/cpuinfo): XLA:CPU
  compiles for the host's extensions, so two machines sold under one model name (AMD
  EPYC: AVX2 only on Zen 3, AVX-512 on Zen 4) run other code."""
  info = _cpuinfo()
  if info is None:
    return platform.machine()
  fields, flags = info
  ident = " ".join(f"{k} {fields[k]}" for k in CPU_ID_FIELDS if k in fields)
  return f"{ident}; {' '.join(x for x in SIMD_FLAGS if x in flags) or 'no vector flags'}"


def version(pkg: str) -> str:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment(packages=("jax", "jaxlib", "flax", "optax", "numpy")) -> dict:
  """What a trained result depends on besides the code and the seed: the CPU (model,
  family, vector extensions), the backend and the numeric packages' versions. XLA compiles
  other instructions for another CPU or version, float32 sums round differently, and a
  training run's trajectory drifts apart from there; results from two environments are not
  comparable cell by cell."""
  import jax
  return {"cpu": cpu_model(), "cpu_id": cpu_id(), "backend": jax.default_backend(),
          "python": platform.python_version(), **{p: version(p) for p in packages}}


def facts(**extra) -> dict:
  """The run's facts: versions, backend, threads (extra: the script's own)."""
  import jax
  out = {"python": platform.python_version(), "jax": jax.__version__,
         "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
         "cores": cores(), "jax_threads": f"XLA:CPU default pool, {cores()} (one per core)",
         "load_average": os.getloadavg()[0]}
  out.update(extra)
  return out


def report(script: str, rows: list, run_facts: dict, json_path: str = None) -> None:
  """Prints the rows as a markdown table and writes them to json_path if given."""
  for r in rows:
    r["script"] = script
  print()
  print(HEADER)
  for r in rows:
    print(markdown_row(r))
  print()
  print("facts:", json.dumps(run_facts))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"script": script, "facts": run_facts, "rows": rows}, f, indent=1)


# ----------------------------------------------------------------------------- worker


class Worker:
  """The library side of a benchmark in its own process.

  `python SCRIPT --worker=SPEC_JSON` (the script calls `serve` then) builds the works,
  answers {"info": ...} once ready, then runs one timed call per request. The parent keeps
  stdout for the protocol; everything the libraries print goes to stderr.
  """

  def __init__(self, script: str, spec: dict, env: dict = None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script), "--worker=" + json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env)
    self.info = self._read()["info"]

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker exited (status {self.proc.wait()})")
    msg = json.loads(line)
    if "error" in msg:
      raise RuntimeError("benchmark worker: " + msg["error"])
    return msg

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def timer(self, work: str):
    """A zero-argument callable for `interleave`: one call of `work` in the worker,
    returning the seconds the worker measured."""
    def fn():
      return self.ask(op="time", work=work)["seconds"]
    fn.self_timed = True
    return fn

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=120)


def serve(build) -> None:
  """Worker loop: build() -> (works: name -> zero-argument callable that finishes its work,
  info: dict); then one line of JSON per request on stdin, one reply per line on stdout."""
  proto = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # whatever the libraries print goes to stderr
  sys.stdout = sys.stderr

  def send(msg):
    proto.write(json.dumps(msg) + "\n")
    proto.flush()

  try:
    works, info = build()
  except Exception as e:  # pylint: disable=broad-except
    send({"error": f"{type(e).__name__}: {e}"})
    raise
  send({"info": info})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("op") == "time":
      t = time.perf_counter()
      works[cmd["work"]]()
      send({"seconds": time.perf_counter() - t})
    else:
      send({"error": f"unknown request {cmd!r}"})
