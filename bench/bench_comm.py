r"""Bytes communicated per DeepSSIM train step under data parallelism, read from the program.

Compiles (never runs) the real train step (deepssim_jax.train.train_step: augmentation,
Siamese forward and backward, AdamW with the frozen stages) for ConvNeXt-Base over an
N-device fake-CPU mesh (batch on "data", state replicated), then reads XLA's optimised,
SPMD-partitioned HLO: every cross-device collective (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute) with the bytes of its operands. The
expectation to check: one all-reduce of the gradients, 4 bytes x parameters, per step
(plus a few scalars: loss, metrics). XLA combines the per-parameter all-reduces into a few
large ones; the count printed is after combining. train_step zeroes the gradients of the
frozen stages before anything reads them, so neither their backward pass nor their
all-reduce is in the program: the payload is 4 B x the trainable parameters (before that
change it was 4 B x all 88.2 M parameters, 352.9 MB). The other collectives are small:
BatchNorm statistics of the head
(synchronised over the batch) and an all-to-all that re-shards the concatenated
[images_a; images_b] batch (its size grows with the per-device batch x image size).

Per device, a ring all-reduce of B bytes over N devices sends and receives
2 (N - 1) / N x B; the step's FLOPs per device come from XLA's cost analysis of the same
program, so the printed table gives the compute / communication balance for a few typical
links (bandwidths are nominal per-direction figures; adjust to your hardware).

The payload does not depend on the image size or the batch (the gradient is one copy of
the parameters whatever the batch), so the program is compiled at a small size; FLOPs are
scaled to the paper's 136 x 112 (convolutions are linear in pixels).

Usage (a few minutes of compilation on 2 CPU cores):
  python bench/bench_comm.py                       # ConvNeXt-Base, 4 devices
  python bench/bench_comm.py --devices=8 --model=convnext_tiny
"""

import argparse
import os
import re
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--model", default="convnext_base")
parser.add_argument("--image_size", type=int, nargs=2, default=(64, 64),
                    help="compiled size (the payload does not depend on it)")
parser.add_argument("--per_device_batch", type=int, default=2, help="pairs per device")
parser.add_argument("--num_frozen_stages", type=int, default=2)
args = parser.parse_args()

# Before JAX starts: N fake CPU devices; LLVM level 0 only speeds up the backend (the HLO
# passes that insert and combine collectives run as usual).
os.environ["XLA_FLAGS"] = " ".join([
    re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")),
    f"--xla_force_host_platform_device_count={args.devices}",
    "--xla_backend_optimization_level=0"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deepssim_jax import augment, config_lib, models, parallel, train  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8,
               "u64": 8, "pred": 1, "s8": 1, "u8": 1}
# "%name = <result shape(s)> all-reduce(" or "all-reduce-start(" (async form on GPU/TPU).
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
# Nominal per-direction bandwidth per device, GB/s.
LINKS = {"NVLink 4 (H100 SXM)": 450, "NVLink 3 (A100 SXM)": 300, "TPU v4 ICI (1 link)": 45,
         "PCIe 4 x16": 25, "InfiniBand HDR 200 Gb/s": 25, "100 GbE": 12.5}
# Assumed sustained training throughput per device, TFLOP/s (roughly 30-40% of the dense
# bf16 peak; float32/TF32 training gets less).
DEVICE_TFLOPS = {"H100": 300, "A100": 100, "TPU v4 chip": 100}


def collectives(hlo: str) -> list[tuple[str, int]]:
  """(op, bytes of its result = of its operands) for each collective of an HLO module."""
  out = []
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m or "-done" in line.split("=")[0]:
      continue
    nbytes = 0
    for dtype, dims in _SHAPE.findall(m.group(1)):
      if dtype in DTYPE_BYTES:
        nbytes += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    out.append((m.group(2), nbytes))
  return out


def main():
  n = args.devices
  assert jax.device_count() == n, jax.devices()
  config = config_lib.base_config()
  config.model.name = args.model
  config.model.num_frozen_stages = args.num_frozen_stages
  config.model.overrides = dict(depthwise_impl="conv")  # same parameters, faster compile
  mesh = parallel.make_mesh()
  size = tuple(args.image_size)
  state = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0), size, 1000))
  total = models.param_count(state.params)
  mask = models.freeze_mask(state.params, args.num_frozen_stages)
  trainable = int(sum(np.prod(p.shape) for p, t in zip(jax.tree.leaves(state.params),
                                                       jax.tree.leaves(mask)) if t))
  rep, dat = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  b = args.per_device_batch * n
  batch = {"image_a": jax.ShapeDtypeStruct((b, *size), jnp.float32, sharding=dat),
           "image_b": jax.ShapeDtypeStruct((b, *size), jnp.float32, sharding=dat),
           "ssim": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=dat),
           "weight": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=dat)}
  aug = augment.AugmentConfig.from_config(config.aug)
  step = jax.jit(lambda s, x, r: train.train_step(
      s, x, r, aug=aug, optim=config.optim, total_steps=1000,
      num_frozen_stages=args.num_frozen_stages), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  print(f"compiled the {args.model} train step for {n} devices in "
        f"{time.perf_counter() - t0:.0f} s")
  ops = collectives(compiled.as_text())
  comm = sum(nb for _, nb in ops)
  kinds = {}
  for op, nb in ops:
    c, s = kinds.get(op, (0, 0))
    kinds[op] = (c + 1, s + nb)
  biggest = sorted((nb for _, nb in ops), reverse=True)[:5]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  # Per device and per pair at the paper's 136 x 112.
  flops_pair = flops / args.per_device_batch * (136 * 112) / (size[0] * size[1])

  mb = 1e6
  print(f"\nmodel {args.model}: {total:,} parameters, {trainable:,} trainable "
        f"({args.num_frozen_stages} stages frozen: {total - trainable:,})")
  print(f"expected gradient all-reduce: 4 B x {total:,} = {4 * total / mb:.1f} MB (all "
        f"parameters) / 4 B x trainable = {4 * trainable / mb:.1f} MB")
  print(f"collectives in the compiled step ({n} devices, per-device batch "
        f"{args.per_device_batch} pairs, {size[0]}x{size[1]}):")
  for op, (c, s) in sorted(kinds.items()):
    print(f"  {op:18s} {c:4d} ops  {s / mb:10.3f} MB")
  print(f"  total              {len(ops):4d} ops  {comm / mb:10.3f} MB  = "
        f"{comm / (4 * total):.4f} x 4 B x params, {comm / (4 * trainable):.4f} x 4 B x "
        f"trainable; largest ops (MB): {[round(x / mb, 2) for x in biggest]}")
  ring = 2 * (n - 1) / n
  print(f"ring all-reduce traffic per device per step: 2(N-1)/N x {comm / mb:.1f} MB = "
        f"{ring * comm / mb:.1f} MB (N={n}); -> {2 * comm / mb:.1f} MB as N grows")
  print(f"train-step FLOPs per pair (XLA cost analysis, scaled to 136x112): "
        f"{flops_pair / 1e9:.1f} GFLOP")
  print("\ncompute per step at 32 pairs per device (assumed sustained TFLOP/s) vs gradient "
        "all-reduce time (ring, N large, nominal link bandwidth per device):")
  t_comp = {d: 32 * flops_pair / (tf * 1e12) for d, tf in DEVICE_TFLOPS.items()}
  print("  compute: " + ", ".join(f"{d} ({DEVICE_TFLOPS[d]} TFLOP/s) {t * 1e3:.0f} ms"
                                  for d, t in t_comp.items()))
  for link, gbs in LINKS.items():
    t = 2 * comm / (gbs * 1e9)
    print(f"  {link:26s} {gbs:6.1f} GB/s: {t * 1e3:6.1f} ms")


if __name__ == "__main__":
  main()
