"""Benchmark: the reference LDM UNet's train step and DDIM sampling, vs MONAI and vs matmul.

Figures (the reference's LDM settings, brAIn-science/DeepSSIM): one AdamW train step of
DiffusionModelUNet_ref (183,981,059 parameters, unconditioned) on a batch of 8 latents
3 x 36 x 28 (noise-prediction MSE, ldm_jax.train_diffusion.train_step), and DDIM sampling of
8 latents with 50 steps, eta 0 (ldm_jax.diffusion.ddim_sample, one compiled lax.scan).

For each: the median time over the repetitions, the FLOPs XLA counts for the compiled
program (cost_analysis), the achieved FLOP/s and its fraction of this machine's float32
matmul FLOP/s, measured in the same run (a jnp 2048 x 2048 matmul timed between the
repetitions, median), and the ratio to MONAI's time measured earlier on this kind of
machine (torch eager, 2 threads: 11.2 s per train step, 147 s for DDIM). The machine is shared:
quote the ratios, not the absolute seconds.

Usage:
  nice -n 5 python bench/bench_ldm.py                      # 5 train reps, 2 DDIM reps
  python bench/bench_ldm.py --train_reps 3 --ddim_steps 5   # DDIM timed on 5 steps, x10
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

MONAI = {"train step": 11.2, "DDIM 50 steps": 147.0}  # seconds, an earlier session (quiet machine)


def matmul_flops_per_s(n: int = 2048, reps: int = 3) -> float:
  """Median FLOP/s of a jitted float32 n x n matmul (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(ts))


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def timed(fn, reps: int, peaks: list) -> list:
  """Times fn() (which blocks) `reps` times, a matmul peak measured before each."""
  ts = []
  for _ in range(reps):
    peaks.append(matmul_flops_per_s())
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  peaks.append(matmul_flops_per_s())
  return ts


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--train_reps", type=int, default=5)
  p.add_argument("--ddim_reps", type=int, default=2)
  p.add_argument("--ddim_steps", type=int, default=50)
  args = p.parse_args()

  import optax  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  from ldm_jax import diffusion, train_diffusion, unet  # pylint: disable=g-import-not-at-top

  shape = (args.batch, 36, 28, 3)
  model = unet.DiffusionModelUNet_ref()
  t0 = time.perf_counter()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape[1:])),
                               jnp.zeros((1,), jnp.int32))["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"# {jax.devices()[0].device_kind} x {jax.device_count()}, JAX {jax.__version__}; "
        f"UNet {n_params:,} parameters, init {time.perf_counter() - t0:.1f} s", flush=True)
  schedule = diffusion.make_schedule()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.adamw(2.5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
  batch = {"mu": jax.random.normal(jax.random.key(2), shape),
           "sigma": jnp.zeros(shape)}
  step = jax.jit(functools.partial(train_diffusion.train_step, schedule=schedule,
                                   sample_latent=False, learning_rate=2.5e-5),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled_step = step.lower(state, batch, jax.random.key(3)).compile()
  step_flops = flops_of(compiled_step)
  print(f"# train step compiled in {time.perf_counter() - t0:.1f} s", flush=True)
  holder = {"state": state}

  def run_step():
    holder["state"], m = compiled_step(holder["state"], batch, jax.random.key(3))
    jax.block_until_ready(m)

  run_step()  # warm-up

  apply = train_diffusion.make_apply(model)
  sample = jax.jit(lambda prm, x: diffusion.ddim_sample(
      apply, prm, schedule, shape, jax.random.key(0), num_inference_steps=args.ddim_steps,
      eta=0.0, x_T=x))
  x_T = jax.random.normal(jax.random.key(4), shape)
  t0 = time.perf_counter()
  compiled_sample = sample.lower(params, x_T).compile()
  sample_flops = flops_of(compiled_sample)
  print(f"# DDIM sampler compiled in {time.perf_counter() - t0:.1f} s", flush=True)
  # XLA counts a scan body once: scale by the number of steps if it reports one step only.
  one_fwd = flops_of(jax.jit(lambda prm, x: apply(prm, x, jnp.zeros((shape[0],), jnp.int32),
                                                  None)).lower(params, x_T).compile())
  if sample_flops < 0.5 * args.ddim_steps * one_fwd:
    sample_flops = args.ddim_steps * one_fwd

  def run_sample():  # the step donated `state` (and so `params`): sample with its params
    jax.block_until_ready(compiled_sample(holder["state"].params, x_T))

  peaks = []
  t_step = timed(run_step, args.train_reps, peaks)
  print(f"# train step times {['%.2f' % t for t in t_step]}", flush=True)
  # no DDIM warm-up: it is compiled ahead of time and one run takes minutes on CPU
  t_sample = timed(run_sample, args.ddim_reps, peaks)
  print(f"# DDIM times {['%.1f' % t for t in t_sample]}", flush=True)
  peak = float(np.median(peaks))
  rows = [("train step", float(np.median(t_step)), step_flops),
          (f"DDIM {args.ddim_steps} steps", float(np.median(t_sample)), sample_flops)]
  if args.ddim_steps != 50:  # the scan's steps are identical: extrapolate to 50
    rows.append(("DDIM 50 steps", rows[1][1] * 50 / args.ddim_steps,
                 rows[1][2] * 50 / args.ddim_steps))
  print(f"\nmatmul 2048^2 float32 (jnp), median of {len(peaks)}: {peak / 1e9:.1f} GFLOP/s\n")
  print("| figure (batch 8, latents 3x36x28, DiffusionModelUNet_ref) | seconds (median) | "
        "GFLOP | GFLOP/s | fraction of matmul | MONAI s | MONAI / ours |")
  print("|---|---|---|---|---|---|---|")
  for name, t, fl in rows:
    if name == "DDIM 50 steps" and args.ddim_steps != 50:
      name += f" (extrapolated from {args.ddim_steps})"
    monai = MONAI.get(name.split(" (")[0])
    print(f"| {name} | {t:.2f} | {fl / 1e9:.1f} | {fl / t / 1e9:.1f} | {fl / t / peak:.2f} | "
          f"{monai if monai else '-'} | {monai / t if monai else float('nan'):.2f} |")


if __name__ == "__main__":
  main()
