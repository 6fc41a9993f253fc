"""Benchmark: SSIM targets in JAX (all-pairs, indexed, aligned) vs a scikit-image loop.

One row per JAX function (ours), each against the same scikit-image anchor (theirs), in
pairs per second; the ratio is our rate over scikit-image's. The main figure is
`deepssim_jax.ssim.ssim_all_pairs` on an N x N set of z-scored 136 x 112 MRI slices
(default 256 x 256 = 65,536 pairs), in pairs per second. The anchor, measured in the
same run, is the reference's way: scikit-image's structural_similarity(a, b,
data_range=a.max() - a.min()) in a Python loop over in-memory float64 z-scored pairs of the
same images. scikit-image runs at its fastest: in its own
process started with MALLOC_MMAP_THRESHOLD_=4000000 MALLOC_TRIM_THRESHOLD_=100000000 (glibc
reads them at start-up); it is also run with the default malloc, for context. The machine is
shared, so the repetitions of the figure and of the anchors are interleaved (the anchor
processes stay alive and run one repetition on request) and medians are reported.

The other rows: `ssim_indexed` on random pairs of the bank with precomputed moments (the
pair-table job), the plain per-pair jit(vmap) dm-pix SSIM (`ssim_pairs`), and
`aligned_ssim` over 4 flips x 7 angles (its rate counts candidate SSIMs). It checks the
all-pairs values against the scikit-image values it timed.

Usage:
  python bench/bench_ssim.py                 # 256 x 256, 2,000 scikit-image pairs, 5 reps
  python bench/bench_ssim.py --n 128 --reps 7
  python bench/bench_ssim.py --quick --json=/tmp/ssim.json   # 32 x 32, 100 pairs, 2 reps
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import benchlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "4000000", "MALLOC_TRIM_THRESHOLD_": "100000000"}


def mri_slices(n, shape=(136, 112)):
  """n z-scored (float64) axial slices of the vendored MRI volumes, resized to `shape`."""
  import nibabel as nib
  from skimage.transform import resize
  from deepssim_jax.data import images
  out = []
  paths = sorted(glob.glob(os.path.join(ROOT, "deepssim_jax", "data", "mri", "*.nii.gz")))
  for path in paths:
    img = nib.as_closest_canonical(nib.load(path))
    nz = img.shape[2]
    for k in np.unique(np.linspace(0.3 * nz, 0.7 * nz, 80).astype(int)):
      sl = np.asarray(img.dataobj[:, :, k], np.float64).T[::-1]
      out.append(resize(sl, shape, order=1, anti_aliasing=True, preserve_range=True))
  x = np.stack(out)
  x = np.concatenate([x, x[:, :, ::-1]])[:n]  # mirrored copies if the volumes run short
  if len(x) < n:
    raise SystemExit(f"only {len(x)} slices available, asked for {n}")
  return images.zscore(x, dtype=np.float64)


def skimage_worker(data_path):
  """Child process: loads the pairs, then runs one timed loop per 'go' line on stdin."""
  from skimage.metrics import structural_similarity
  d = np.load(data_path)
  a, b = d["a"], d["b"]
  values = None
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "go":
      t, c = time.perf_counter(), time.process_time()
      values = [structural_similarity(x, y, data_range=x.max() - x.min()) for x, y in zip(a, b)]
      print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c}),
            flush=True)
    elif cmd == "values":
      print(json.dumps({"values": values}), flush=True)


class SkimageProcess:
  """A scikit-image loop in its own process (with a given malloc environment)."""

  def __init__(self, data_path, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNED}
    env.update(env_extra)
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                  data_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)

  def ask(self, cmd):
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("scikit-image worker died")
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sizes = {  # option: (default, --quick)
      "n": (256, 32), "skimage_pairs": (2000, 100), "indexed_pairs": (16384, 1024),
      "plain_pairs": (1024, 128), "aligned_pairs": (64, 8), "reps": (5, 2)}
  p.add_argument("--n", type=int, default=None, help="all-pairs set size (n x n pairs)")
  for name in list(sizes)[1:]:
    p.add_argument("--" + name, type=int, default=None)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  benchlib.add_args(p)
  args = p.parse_args()
  if args.worker:
    return skimage_worker(args.worker)
  for name, (full, quick) in sizes.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)

  import jax
  import jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from deepssim_jax import ssim as S  # pylint: disable=import-outside-toplevel

  z64 = mri_slices(args.n)
  n = len(z64)
  za = jnp.asarray(z64, jnp.float32)
  zb = za[np.random.default_rng(1).permutation(n)]
  # scikit-image pairs: the first rows of the same n x n matrix, float64 as the reference.
  k = np.arange(args.skimage_pairs)
  ia_sk, ib_sk = k // n, k % n
  z_b64 = z64[np.random.default_rng(1).permutation(n)]
  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "pairs.npz")
    np.savez(data_path, a=z64[ia_sk], b=z_b64[ib_sk])
    anchors = {"tuned": SkimageProcess(data_path, MALLOC_TUNED),
               "default": SkimageProcess(data_path, {})}

    rng = np.random.default_rng(2)
    ia = jnp.asarray(rng.integers(0, n, args.indexed_pairs))
    ib = jnp.asarray(rng.integers(0, n, args.indexed_pairs))
    stats_a, stats_b = S.image_stats(za), S.image_stats(zb)
    pa = za[ia[:args.plain_pairs] % n]
    pb = zb[ib[:args.plain_pairs] % n]
    angles = jnp.linspace(-0.15, 0.15, 7)
    al_a, al_b = za[:args.aligned_pairs], zb[:args.aligned_pairs]

    figures = {  # name: (function, pairs per call)
        f"ssim_all_pairs {n}x{n} (moments once per image)":
            (lambda: S.ssim_all_pairs(za, zb), n * n),
        f"ssim_indexed, {args.indexed_pairs} random pairs, precomputed moments":
            (lambda: S.ssim_indexed(stats_a, stats_b, ia, ib), args.indexed_pairs),
        f"ssim_pairs: plain jit(vmap) dm-pix, {args.plain_pairs} pairs":
            (lambda: S.ssim_pairs(pa, pb), args.plain_pairs),
        f"aligned_ssim, {args.aligned_pairs} pairs x 28 candidates":
            (lambda: S.aligned_ssim(al_a, al_b, angles), args.aligned_pairs),
    }
    times = {name: [] for name in list(figures) + list(anchors)}
    cpu = {name: [] for name in times}
    for fn, _ in figures.values():  # warm-up: compile
      jax.block_until_ready(fn())
    for proc in anchors.values():
      proc.ask("go")
    for _ in range(args.reps):
      for name, (fn, _) in figures.items():
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)
      for name, proc in anchors.items():
        r = proc.ask("go")
        times[name].append(r["seconds"])
        cpu[name].append(r["cpu"])
    sk_values = np.asarray(anchors["tuned"].ask("values")["values"])
    for proc in anchors.values():
      proc.close()

  m = np.asarray(S.ssim_all_pairs(za, zb))
  err = np.abs(m[ia_sk, ib_sk] - sk_values).max()
  pairs = lambda name: figures[name][1] if name in figures else args.skimage_pairs
  # aligned_ssim computes 28 candidate SSIMs per pair: its rates count candidates.
  per = {name: 28 if name.startswith("aligned_ssim") else 1 for name in times}
  rate = {name: per[name] * pairs(name) / np.median(t) for name, t in times.items()}
  cpu_rate = {name: per[name] * pairs(name) / np.median(t) for name, t in cpu.items()}
  anchor = rate["tuned"]
  import skimage  # pylint: disable=import-outside-toplevel
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; images 136 x 112, "
        f"median of {args.reps} interleaved repetitions after warm-up")
  print("scikit-image anchor: own process with " +
        " ".join(f"{k}={v}" for k, v in MALLOC_TUNED.items()) + ", float64 inputs")
  print(f"scikit-image with the default malloc: {rate['default']:,.0f} pairs/s "
        f"({rate['default'] / anchor:.2f}x the tuned anchor)")
  print("pairs/CPU-s (per second of CPU time of the measuring process, all its threads; less "
        "sensitive to the other users of the machine), ours vs the anchor: " + ", ".join(
            f"{name.split(' ')[0].rstrip(',:')} {cpu_rate[name] / cpu_rate['tuned']:.2f}x"
            for name in figures))
  print(f"max |all-pairs - scikit-image| over the {args.skimage_pairs} timed pairs: {err:.2e}")
  theirs_impl = (f"scikit-image {skimage.__version__} structural_similarity loop, float64, "
                 "own process, malloc tuned")
  rows = []
  for name in figures:
    rows.append(benchlib.row(
        name + (" (rate per candidate SSIM)" if per[name] > 1 else ""),
        float(np.median(times[name])),
        float(np.median(times["tuned"])), theirs_impl, "pairs", per[name] * figures[name][1],
        args.skimage_pairs))
  benchlib.report("bench_ssim", rows, benchlib.facts(skimage=skimage.__version__,
                                                     max_abs_err=float(err)), args.json)

if __name__ == "__main__":
  main()
