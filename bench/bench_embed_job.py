"""Benchmark: the embedding job end to end (read, preprocess, forward, write a store).

Two inputs from the vendored volumes: the axial slices of the five NIfTI volumes (read,
reoriented, resampled to 136 x 112 and z-scored on the fly) and the same number of 8-bit
PNGs in the reference layout (written once, before timing). For each, the job's
images/s, the share of its wall time spent waiting on input (grain threads reading ahead
while the devices compute), and the forward-only rate of the same model on images already
in memory, measured in the same run. The machine is shared, so every rate is also given
as a fraction of the dense float32 matmul rate timed just before it (FLOPs of the model as
XLA counts them for the plain grouped-conv formulation).

Theirs, in every row: the reference's embedder (torchvision ConvNeXt + its head, torch
eager, same threads, same batch: bench_embedder.py's torch side, in its own process)
forward alone on images already in memory, timed in the same run, interleaved with our
forward-only repetitions. Its reading is excluded, so the job rows' ratio is a lower bound
on how ours compares with the reference's whole job.

Usage:
  python bench/bench_embed_job.py                          # convnext_base, 192 images
  python bench/bench_embed_job.py --model convnext_atto --n 2000   # input-bound case
  python bench/bench_embed_job.py --quick --json=/tmp/job.json     # convnext_atto, 16 images
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(BENCH, ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchlib  # noqa: E402
from deepssim_jax import data, embed, models, parallel  # noqa: E402
from deepssim_jax.data import demo  # noqa: E402


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
  ap.add_argument("--model", default=None, choices=sorted(models.MODELS),
                  help="default convnext_base; --quick convnext_atto")
  ap.add_argument("--n", type=int, default=None, help="images per input kind (a multiple of "
                  "the batch avoids timing a padded last batch); default 192, --quick 16")
  ap.add_argument("--batch", type=int, default=None, help="default 32, --quick 8")
  ap.add_argument("--reps", type=int, default=None,
                  help="forward-only repetitions; default 3, --quick 2")
  ap.add_argument("--shard_rows", type=int, default=4096)
  ap.add_argument("--threads", type=int, default=4)
  benchlib.add_args(ap)
  args = ap.parse_args(argv)
  model_name = args.model or ("convnext_atto" if args.quick else "convnext_base")
  n = args.n or (16 if args.quick else 192)
  bsz = args.batch or (8 if args.quick else 32)
  reps = args.reps or (2 if args.quick else 3)
  size = (136, 112)
  arch = models.MODELS[model_name].keywords
  theirs = benchlib.Worker(os.path.join(BENCH, "bench_embedder.py"), {
      "model": model_name, "dims": list(arch["dims"]), "depths": list(arch["depths"]),
      "batch": bsz, "size": list(size), "passes": ["forward"], "freezes": [],
      "threads": benchlib.cores(), "drop_path": 0.0, "malloc_tuning": False})
  print(f"threads: jax (XLA:CPU pool) {benchlib.cores()}, torch {theirs.info['threads']}")
  mesh = parallel.make_mesh()
  model = models.make_model(model_name)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, *size), jnp.float32))
  embed_fn = embed.make_embed_fn(model)
  anchor = benchlib.MatmulAnchor()
  tmp = tempfile.mkdtemp(prefix="bench_embed_")
  try:
    sources = {"nifti": nifti_source(n, size)}
    sources["png"] = png_source(n, size, os.path.join(tmp, "png"))
    x = np.stack([sources["nifti"][i] for i in range(min(n, len(sources["nifti"])))])
    gflop = flops_per_image(model_name, size) / 1e9
    # Forward only, in memory, both sides (theirs: one batch per call).
    t = benchlib.interleave(
        {"ours": lambda: embed.embed_array(model, variables, x, bsz, mesh, progress=False,
                                           embed_fn=embed_fn),
         "theirs": theirs.timer("forward")}, reps, anchor)
    theirs_s = benchlib.median(t["theirs"])
    print(f"{model_name} ({gflop:.2f} GFLOP/img), batch {bsz}, {jax.device_count()} "
          f"device(s), {len(x)} images")
    impl = theirs.info["impl"] + ", forward only, in memory"
    rows = [benchlib.row(f"{model_name} embedding, in memory, forward only",
                         benchlib.median(t["ours"]), theirs_s, impl, "img", len(x), bsz,
                         flops_per_item=gflop * 1e9, matmul_gflops=anchor.gflops())]
    for name, src in sources.items():
      folder = os.path.join(tmp, "store_" + name)
      anchor.time()
      r = embed.embed_to_store(embed_fn, variables, src, folder, batch_size=bsz,
                               shard_rows=args.shard_rows, fingerprint=name, mesh=mesh,
                               num_threads=args.threads, progress=False)
      assert r["complete"]
      rows.append(benchlib.row(
          f"{model_name} embedding job, {name}: read + embed + write a store",
          r["n"] / r["images_per_s"], theirs_s, impl, "img", r["n"], bsz,
          flops_per_item=gflop * 1e9, matmul_gflops=anchor.gflops(),
          note=f"{100 * r['input_wait_fraction']:.1f}% of the time waiting on input"))
  finally:
    theirs.close()
    shutil.rmtree(tmp, ignore_errors=True)
  benchlib.report("bench_embed_job", rows, benchlib.facts(
      torch=theirs.info["torch"], torch_threads=theirs.info["threads"], model=model_name),
      args.json)

if __name__ == "__main__":
  main()
