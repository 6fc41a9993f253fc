"""Benchmark: DeepSSIM embedder (ConvNeXt) forward and Siamese train step on this CPU.

The figure is the achieved FLOP rate of the jitted model as a fraction of this machine's
dense float32 matmul rate (a jnp 2048^2 matmul, measured interleaved with every repetition,
since the machine is shared). The anchor is the PyTorch reference's fraction on the same
machine (torch eager, 2 threads, measured for this project earlier): ConvNeXt-B eval forward, 3x136x112, batch 32: 14.9 img/s x
8.78 GFLOP/img = 131 GFLOP/s, ~69% of the 189-197 GFLOP/s matmul peak; train step of 32
pairs (both branches, AdamW): 8.6 s with the reference's name-matching freeze, 12.5 s with
only stem + first stage frozen.

FLOPs: every implementation is credited with the FLOPs XLA counts for the plain formulation
(`depthwise_impl="conv"`: one grouped convolution per depthwise layer), i.e. the model's
true arithmetic; the shifted-sum and dense forms make XLA count more (the dense form does
extra multiply-adds on purpose). Train-step FLOPs depend on the freezing (frozen weights get
no gradient, and nothing before the first trainable layer is back-propagated), so the
reference's fraction is computed from its time and the FLOPs of the same freezing.

Train step: both branches in one 2B batch (shared weights, as deepssim_jax.train does),
BatchNorm in train mode, dropout 0.33, stochastic depth 0.5 (torchvision's convnext_base
default, which the reference trains with), MSE(cosine, ssim), optax.multi_transform with
clip_by_global_norm(1) + adamw(1e-3, wd 1e-3) on trainable leaves and set_to_zero on frozen.

Usage:
  python bench/bench_embedder.py                      # convnext_base, batch 32, 5 reps
  python bench/bench_embedder.py --model convnext_tiny --passes forward --reps 7
  python bench/bench_embedder.py --impls auto,shift --freeze 2,ref
"""

import argparse
import functools
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from deepssim_jax import models  # noqa: E402

# The PyTorch reference (torch eager, 2 threads) measured earlier on this kind of machine.
REF_PEAK_GFLOPS = 193.0           # midpoint of the 189-197 GFLOP/s numpy matmul peak
REF_FORWARD_FRACTION = 0.69       # ConvNeXt-B eval, batch 32: 14.9 img/s x 8.78 GFLOP/img
REF_TRAIN_SECONDS = {"ref": 8.6, "1": 12.5}   # per step of 32 pairs, by freezing


def tune_malloc(mmap_threshold: int = 2**31 - 1, trim_threshold: int = 2**31 - 1) -> bool:
  """Keeps freed memory in glibc's heap instead of returning it to the OS.

  XLA:CPU allocates every large intermediate with malloc; with glibc's defaults, blocks
  above 32 MB are mmap-ed and unmapped again each step, so every step pays page faults on
  fresh pages (a 30464x128 @ 128x512 matmul runs at ~60% of the matmul rate instead of
  ~100%). Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:trim_threshold=...
  Returns whether both settings were accepted.
  """
  import ctypes
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  ok = libc.mallopt(m_mmap_threshold, ctypes.c_int(mmap_threshold))
  ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(trim_threshold))
  return bool(ok)


def torchvision_name(path):
  """torchvision convnext `features` state-dict key of one of our backbone parameters."""
  top, rest = path[0], path[1:]
  if top == "stem":
    return "features.0.%d.%s" % ({"conv": 0, "norm": 1}[rest[0]],
                                 {"kernel": "weight", "scale": "weight"}.get(rest[1], rest[1]))
  i = int(top.split("_")[1])
  if rest[0] == "downsample":
    return "features.%d.%d.%s" % (2 * i, {"norm": 0, "conv": 1}[rest[1]],
                                  {"kernel": "weight", "scale": "weight"}.get(rest[2], rest[2]))
  j = int(rest[0].split("_")[1])
  if rest[1] == "layer_scale":
    return "features.%d.%d.layer_scale" % (2 * i + 1, j)
  layer = {"dwconv": 0, "norm": 2, "pwconv1": 3, "pwconv2": 5}[rest[1]]
  leaf = {"kernel": "weight", "scale": "weight"}.get(rest[2], rest[2])
  return "features.%d.%d.block.%d.%s" % (2 * i + 1, j, layer, leaf)


def reference_labels(params):
  """The reference's freeze: every backbone parameter whose torchvision name has a 0 or 1."""
  flat = traverse_util.flatten_dict(params)
  labels = {}
  for path in flat:
    frozen = False
    if path[0] == "backbone":
      name = torchvision_name(path[1:])
      frozen = bool(re.search(r"[01]", name))
    labels[path] = "frozen" if frozen else "train"
  return traverse_util.unflatten_dict(labels)


def labels_for(params, freeze):
  return reference_labels(params) if freeze == "ref" else models.trainable_labels(
      params, int(freeze))


def make_train_step(model, labels):
  tx = optax.multi_transform(
      {"train": optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-3, weight_decay=1e-3)),
       "frozen": optax.set_to_zero()}, labels)

  def step(params, batch_stats, opt_state, a, b, ssim, rng):
    def loss_fn(p):
      emb, upd = model.apply({"params": p, "batch_stats": batch_stats},
                             jnp.concatenate([a, b]), train=True, mutable=["batch_stats"],
                             rngs={"dropout": rng})
      ea, eb = jnp.split(emb, 2)
      return jnp.mean((models.cosine(ea, eb) - ssim) ** 2), upd["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return tx, step


def flops_of(fn, *args):
  """FLOPs XLA counts for fn's HLO before its own optimisation passes.

  Not the compiled module's count: XLA:CPU rewrites the grouped-conv weight gradient as a
  dense convolution (C times the work), which doubles a ConvNeXt-B train step's count
  (3,008 vs 1,475 GFLOP). For the forward pass both counts agree.
  """
  return float(fn.lower(*args).cost_analysis()["flops"])


def timed(fn, args, mm, mm_args, reps):
  """Median seconds of fn(*args) and of the anchor matmul, interleaved, after a warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(mm(*mm_args))
  ts, tm = [], []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(mm(*mm_args))
    tm.append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), float(np.median(tm))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="convnext_base", choices=sorted(models.MODELS))
  ap.add_argument("--batch", type=int, default=32, help="images (forward) / pairs (train)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--size", default="136,112")
  ap.add_argument("--impls", default="auto", help="comma list of depthwise_impl values")
  ap.add_argument("--passes", default="forward,train")
  ap.add_argument("--freeze", default="2,1,ref",
                  help="train-step freezings: N stages frozen, or 'ref' (reference's rule)")
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--malloc_tuning", action=argparse.BooleanOptionalAction, default=True,
                  help="keep freed memory in the heap (see tune_malloc)")
  args = ap.parse_args(argv)
  tuned = args.malloc_tuning and tune_malloc()
  h, w = (int(v) for v in args.size.split(","))
  bsz = args.batch
  passes = args.passes.split(",")
  print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"malloc tuned: {tuned}")

  n = args.matmul_n
  am = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  mm = jax.jit(lambda x, y: x @ y)
  mm_flops = 2.0 * n ** 3

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((bsz, h, w), np.float32))
  xb = jnp.asarray(rng.standard_normal((bsz, h, w), np.float32))
  ssim = jnp.asarray(rng.uniform(0, 1, bsz).astype(np.float32))
  key = jax.random.key(0)

  def build(impl):
    model = models.make_model(args.model, depthwise_impl=impl, drop_path_rate=0.5)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x[:1])
    return model, variables

  # True FLOPs from the plain grouped-conv formulation (compiled, never run).
  ref_model, variables = build("conv")
  params, stats = variables["params"], variables["batch_stats"]
  print(f"{args.model}: {models.param_count(params['backbone']):,} backbone / "
        f"{models.param_count(params):,} total parameters; input {bsz} x {h} x {w}")
  true_flops = {}
  if "forward" in passes:
    fwd = jax.jit(lambda v, x: ref_model.apply(v, x, train=False))
    true_flops["forward"] = flops_of(fwd, variables, x)
  freezes = args.freeze.split(",") if "train" in passes else []
  for fz in freezes:
    tx, step = make_train_step(ref_model, labels_for(params, fz))
    opt_state = jax.eval_shape(tx.init, params)
    true_flops["train/" + fz] = flops_of(jax.jit(step), params, stats, opt_state, x, xb, ssim,
                                         key)
  del ref_model

  rows = []
  for impl in args.impls.split(","):
    model, variables = build(impl)
    params, stats = variables["params"], variables["batch_stats"]
    if "forward" in passes:
      fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
      t, tm = timed(fwd, (variables, x), mm, (am, am), args.reps)
      rows.append((impl, "forward", bsz, bsz / t, t, true_flops["forward"], tm,
                   REF_FORWARD_FRACTION))
    for fz in freezes:
      tx, step = make_train_step(model, labels_for(params, fz))
      opt_state = tx.init(params)
      # No donation: every repetition starts from the same state.
      stepj = jax.jit(step)
      t, tm = timed(stepj, (params, stats, opt_state, x, xb, ssim, key), mm, (am, am),
                    args.reps)
      fl = true_flops["train/" + fz]
      ref_frac = (fl / REF_TRAIN_SECONDS[fz] / 1e9 / REF_PEAK_GFLOPS
                  if fz in REF_TRAIN_SECONDS else float("nan"))
      rows.append((impl, f"train (freeze {fz})", bsz, bsz / t, t, fl, tm, ref_frac))
      del opt_state

  print()
  print("| impl | pass | batch | img/s or pairs/s | s/step | GFLOP/step | GFLOP/s | "
        "matmul GFLOP/s | fraction | reference fraction | ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for impl, name, b, rate, t, fl, tm, ref_frac in rows:
    gfs = fl / t / 1e9
    peak = mm_flops / tm / 1e9
    frac = gfs / peak
    print(f"| {impl} | {name} | {b} | {rate:.2f} | {t:.3f} | {fl / 1e9:.1f} | {gfs:.1f} | "
          f"{peak:.1f} | {frac:.1%} | {ref_frac:.1%} | {frac / ref_frac:.2f} |")
  print("\nmedians of", args.reps, "repetitions; the matmul is timed just before each one.")
  if "train" in passes:
    print("reference train fractions: its step time (an earlier session's measurement) "
          "with the FLOPs XLA counts for "
          f"the same freezing, over {REF_PEAK_GFLOPS:.0f} GFLOP/s; no reference time exists "
          "for other freezings (nan).")


if __name__ == "__main__":
  main()
