"""Benchmark: the embedding job end to end (read, preprocess, forward, write a store).

Two inputs from the vendored volumes: the axial slices of the five NIfTI volumes (read,
reoriented, resampled to 136 x 112 and z-scored on the fly) and the same number of 8-bit
PNGs in the reference layout (written once, before timing). For each, the job's
images/s, the share of its wall time spent waiting on input (grain threads reading ahead
while the devices compute), and the forward-only rate of the same model on images already
in memory, measured in the same run. The machine is shared, so every rate is also given
as a fraction of the dense float32 matmul rate timed just before it (FLOPs of the model as
XLA counts them for the plain grouped-conv formulation). The reference embeds with a
ConvNeXt-B forward at 14.9 img/s, ~69% of the matmul peak on this machine (torch eager,
2 threads, batch 32, reading excluded, as measured for this project earlier): the last
column compares fractions.

Usage:
  python bench/bench_embed_job.py                          # convnext_base, 192 images
  python bench/bench_embed_job.py --model convnext_atto --n 2000   # input-bound case
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepssim_jax import data, embed, models, parallel  # noqa: E402
from deepssim_jax.data import demo  # noqa: E402

REF_FORWARD_IMG_S = 14.9  # PyTorch ConvNeXt-B eval forward, batch 32 (an earlier session)
REF_FORWARD_FRACTION = 0.69  # of the matmul peak, same measurement


def matmul_gflops(n=2048, reps=3):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(mm(a, a))
    ts.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / float(np.median(ts)) / 1e9


def flops_per_image(name, size):
  model = models.make_model(name, depthwise_impl="conv")
  x = jnp.zeros((1, *size), jnp.float32)
  v = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return float(fwd.lower(v, x).cost_analysis()["flops"])


class First:
  """The first n images of a source (so the image count is a multiple of the batch)."""

  def __init__(self, src, n):
    self.src, self.keys = src, list(src.keys)[:n]

  def __len__(self):
    return len(self.keys)

  def __getitem__(self, i):
    return self.src[i]


def nifti_source(n, size):
  _, records = data.find_volumes(demo.MRI_DIR, "folder")
  per = -(-n // len(records)) + 8
  src = data.VolumeSliceSource(records, size=size, band=(0.2, 0.8), num_slices=per)
  if len(src) < n:
    raise SystemExit(f"only {len(src)} slices in the vendored volumes' bands; lower --n")
  return First(src, n)


def png_source(n, size, root):
  src = nifti_source(n, size)
  for i in range(min(n, len(src))):
    data.write_png(os.path.join(root, f"{i:06d}.png"), src[i])
  return data.folder_source(root, size=size)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="convnext_base", choices=sorted(models.MODELS))
  ap.add_argument("--n", type=int, default=192, help="images per input kind (a multiple of "
                  "the batch avoids timing a padded last batch)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--shard_rows", type=int, default=4096)
  ap.add_argument("--threads", type=int, default=4)
  args = ap.parse_args(argv)
  size = (136, 112)
  mesh = parallel.make_mesh()
  model = models.make_model(args.model)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, *size), jnp.float32))
  embed_fn = embed.make_embed_fn(model)
  tmp = tempfile.mkdtemp(prefix="bench_embed_")
  try:
    sources = {"nifti": nifti_source(args.n, size)}
    sources["png"] = png_source(args.n, size, os.path.join(tmp, "png"))
    # Compile once, and the forward-only rate on images already in memory.
    x = np.stack([sources["nifti"][i] for i in range(min(args.n, len(sources["nifti"])))])
    embed.embed_array(model, variables, x[:args.batch], args.batch, mesh, progress=False,
                      embed_fn=embed_fn)
    gflop = flops_per_image(args.model, size) / 1e9
    peak = matmul_gflops()
    t = time.perf_counter()
    embed.embed_array(model, variables, x, args.batch, mesh, progress=False, embed_fn=embed_fn)
    fwd = len(x) / (time.perf_counter() - t)
    print(f"{args.model} ({gflop:.2f} GFLOP/img), batch {args.batch}, {jax.device_count()} "
          f"device(s)")
    print("\n| input | images | img/s | waiting on input | matmul GFLOP/s | fraction of "
          "matmul | vs reference (69%) |")
    print("|---|---|---|---|---|---|---|")
    frac = fwd * gflop / peak
    print(f"| in memory, forward only | {len(x)} | {fwd:.2f} | - | {peak:.0f} | {frac:.1%} | "
          f"{frac / REF_FORWARD_FRACTION:.2f} |")
    for name, src in sources.items():
      folder = os.path.join(tmp, "store_" + name)
      peak = matmul_gflops()
      r = embed.embed_to_store(embed_fn, variables, src, folder, batch_size=args.batch,
                               shard_rows=args.shard_rows, fingerprint=name, mesh=mesh,
                               num_threads=args.threads, progress=False)
      assert r["complete"]
      frac = r["images_per_s"] * gflop / peak
      print(f"| {name}, read + embed + write | {r['n']} | {r['images_per_s']:.2f} | "
            f"{100 * r['input_wait_fraction']:.1f}% | {peak:.0f} | {frac:.1%} | "
            f"{frac / REF_FORWARD_FRACTION:.2f} |")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
