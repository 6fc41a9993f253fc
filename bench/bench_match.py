"""Benchmark: exact streaming top-k matching vs the pure matmul time, with peak memory.

Matches Nq query (synthetic) against Nr reference (training) random unit 256-d float32
embeddings with deepssim_jax.match.match_stores, reading the reference from a temporary
sharded store on disk, so the figure includes what a real audit pays: loading and
normalising the stores, streaming the reference, the top-k, writing the results. The full
score matrix is never formed (at 20,000 x 600,000 it would be 48 GB in float32; this
machine has 24 GB).

Anchor, measured in the same run and interleaved with the figure (the machine is shared):
the time the matching FLOPs (2 * Nq * Nr * d) take at the GFLOP/s of a plain jitted float32
matmul of the block shape the matcher uses ((q_block, d) @ (d, r_block), median of 20
calls). A ratio of 1 would mean the top-k, the streaming and the I/O are free. A larger
matmul's GFLOP/s (2048 x d @ d x 8192) is printed too, for the machine's peak.

Peak memory: resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (covers generating the
stores, which is done shard by shard), or externally:
  /usr/bin/time -v python bench/bench_match.py --small   # "Maximum resident set size"

The row's "theirs" is that matmul time (a lower bound no library reaches), its ratio the
anchor's time over ours, its FLOP share our achieved FLOP/s over the larger matmul's.

Usage:
  python bench/bench_match.py            # 20,000 x 600,000 (about 1-3 min per repetition here)
  python bench/bench_match.py --small    # 2,000 x 60,000
  python bench/bench_match.py --quick --json=/tmp/match.json   # 256 x 16,384, 2 reps
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import benchlib  # noqa: E402  pylint: disable=wrong-import-position
from deepssim_jax import match, parallel, store  # noqa: E402  pylint: disable=wrong-import-position


def _write_random_store(folder, n, d, shard_rows, seed, prefix):
  """A store of n random unit rows, generated shard by shard (bounded memory)."""
  rng = np.random.default_rng(seed)
  for i, start in enumerate(range(0, n, shard_rows)):
    m = min(shard_rows, n - start)
    x = rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store.write_shard(folder, i, np.char.add(prefix, np.arange(start, start + m).astype(str)), x)
  store.finalize(folder, {"fingerprint": f"bench-{seed}"})


def _matmul_gflops(m, n, d, calls=20):
  """Median GFLOP/s of a jitted float32 (m, d) @ (d, n) matmul."""
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.standard_normal((m, d), dtype=np.float32))
  b = jax.device_put(rng.standard_normal((n, d), dtype=np.float32))
  f = jax.jit(lambda x, y: jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST))
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t)
  return 2.0 * m * n * d / np.median(times) / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="2,000 x 60,000 instead of 20,000 x 600,000")
  p.add_argument("--nq", type=int, default=None)
  p.add_argument("--nr", type=int, default=None)
  p.add_argument("--d", type=int, default=256)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--q_block", type=int, default=256)
  p.add_argument("--r_block", type=int, default=8192)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--reps", type=int, default=None, help="default 5, --quick 2")
  p.add_argument("--shard_rows", type=int, default=50_000)
  p.add_argument("--tmpdir", default=None)
  benchlib.add_args(p)
  args = p.parse_args()
  nq = args.nq or (256 if args.quick else 2_000 if args.small else 20_000)
  nr = args.nr or (16_384 if args.quick else 60_000 if args.small else 600_000)
  args.reps = args.reps or (2 if args.quick else 5)
  d, k = args.d, args.k
  mesh = parallel.make_mesh(jax.local_devices())
  print(f"matching {nq:,} x {nr:,} x {d}, k={k}, q_block={args.q_block}, "
        f"r_block={args.r_block}, chunk={args.chunk}, devices={mesh.devices.size} "
        f"({jax.devices()[0].platform})", flush=True)

  with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
    qdir, rdir = os.path.join(tmp, "query"), os.path.join(tmp, "ref")
    t = time.perf_counter()
    _write_random_store(qdir, nq, d, args.shard_rows, 1, "gen-")
    _write_random_store(rdir, nr, d, args.shard_rows, 2, "train-")
    print(f"wrote the stores in {time.perf_counter() - t:.1f} s", flush=True)
    kwargs = dict(q_block=args.q_block, r_block=args.r_block, mesh=mesh, chunk=args.chunk,
                  progress=False)
    # Warm-up: compiles the step for these shapes (same query count, one reference block).
    q_ids, q_emb = store.load_store(qdir)
    r_block = match.ref_block_size(nr, args.r_block, args.chunk)
    first = next(store.iter_store_blocks(rdir, r_block))[1]
    match.topk_match_blocks(q_emb, [first], len(first), k, **dict(kwargs, r_block=r_block))
    del q_ids, q_emb, first

    flops = 2.0 * nq * nr * d
    figures, anchors = [], []
    peak_gflops = _matmul_gflops(2048, 8192, d)
    for rep in range(args.reps):
      # The block shape one device multiplies per step.
      q_sub = match.balanced_block(-(-nq // mesh.devices.size), args.q_block, 8)
      gflops = _matmul_gflops(q_sub, r_block, d)
      anchors.append(flops / gflops / 1e9)
      t = time.perf_counter()
      match.match_stores(qdir, rdir, os.path.join(tmp, "matches.npz"), k, **kwargs)
      figures.append(time.perf_counter() - t)
      print(f"  rep {rep}: {figures[-1]:.2f} s (anchor {anchors[-1]:.2f} s, "
            f"{gflops:.0f} GFLOP/s)", flush=True)
    with np.load(os.path.join(tmp, "matches.npz")) as z:
      assert z["scores"].shape == (nq, k) and np.all(np.diff(z["scores"], axis=1) <= 0)

  fig, anc = float(np.median(figures)), float(np.median(anchors))
  ratios = np.array(figures) / np.array(anchors)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
  rows = [
      ("figure", "value", "anchor (same run)", "ratio"),
      (f"match {nq:,} x {nr:,} (median of {args.reps})", f"{fig:.2f} s",
       f"{anc:.2f} s matmul at {flops / anc / 1e9:.0f} GFLOP/s", f"{fig / anc:.2f}"),
      ("  per-repetition ratio (median, min-max)", "", "",
       f"{np.median(ratios):.2f} ({ratios.min():.2f}-{ratios.max():.2f})"),
      ("achieved", f"{flops / fig / 1e9:.0f} GFLOP/s, {nq * nr / fig / 1e9:.2f} Gpairs/s",
       f"{peak_gflops:.0f} GFLOP/s (2048x{d} @ {d}x8192)",
       f"{flops / fig / 1e9 / peak_gflops:.2f}"),
      ("peak RSS (ru_maxrss)", f"{rss_gb:.2f} GB", "2 GB budget", f"{rss_gb / 2:.2f}"),
  ]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  row = benchlib.row(
      f"streaming top-{k} cosine match {nq:,} x {nr:,} x {d}, stores on disk",
      fig, anc, f"jnp float32 matmul of the same FLOPs at its block shape's rate "
      f"({flops / anc / 1e9:.0f} GFLOP/s): the lower bound", "runs", flops_per_item=flops,
      matmul_gflops=peak_gflops, note=f"peak RSS {rss_gb:.2f} GB")
  benchlib.report("bench_match", [row], benchlib.facts(peak_rss_gb=rss_gb), args.json)


if __name__ == "__main__":
  main()
