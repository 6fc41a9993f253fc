"""Benchmark on one accelerator: float32 against bfloat16 compute, DeepSSIM and the LDM.

Driven by bench/accelerator.sh (which sets the environment); one run, in this order:
  device      the JAX backend and device, and a dense matmul's FLOP/s in float32 and
              bfloat16 (the same-run anchors of the "share" column).
  embedder    ConvNeXt-B DeepSSIM (the paper's head; bench_embedder.py's model and train
              step, stochastic depth 0.5, the reference's freezing) at 136 x 112: forward
              (eval) img/s on a batch of --fwd_batch images and the Siamese train step on
              --train_pairs pairs (both branches in one batch of 2 x pairs), each in float32
              and bfloat16 (model.dtype) and with each --impls depthwise form ("auto" is
              the plain grouped convolution on GPU/TPU, deepssim_jax.depthwise.auto_impl;
              on CPU the default adds conv to compare; on an H200 the CPU-tuned shifted
              sums ran at 0.82x (forward) and 0.71x (train step) of it, so an accelerator's
              default is auto alone), with the train step's loss gap bf16 - f32 from the
              same weights and batch.
  ldm         the LDM UNet of configs/ldm_ixi_diffusion.py (conditioned, 262M parameters):
              train step (batch of 8 latents 3 x 36 x 28) and DDIM sampling (50 steps),
              float32 and bfloat16 (train.mixed_precision), bench_ldm.py's works.
  torch       the same works in torch where torch with CUDA is present (bench_embedder.py's
              and bench_ldm.py's torch sides, moved to the device, bfloat16 under
              torch.autocast, each call synchronised), in their own process after ours: the
              same-run anchors. Skipped, saying why, without CUDA (on the CPU with
              --allow-cpu they run on the CPU, as a smoke test of the code path).
  embed       embedding throughput: embed.embed_array on --embed_n images in memory, and the
              embedding job end to end (embed_to_store: NIfTI slices read and resampled by
              grain threads, forward, store written; bench_embed_job.py's source), per dtype.
  ssim        all-pairs SSIM (deepssim_jax.ssim.ssim_all_pairs) of --ssim_n x --ssim_n
              z-scored 136 x 112 images, pairs/s, with the CPU-sized blocks and larger ones.

Each work: one untimed call first (compilation; its time is reported), then the median of
--reps calls. A section that fails is reported as failed and the run goes on; works not
begun when --budget_s (480 s) has passed are skipped, named in the page. The page (markdown) goes
to --out (default bench/ACCELERATOR.md).

Without an accelerator it stops with an error, unless --allow-cpu (a smoke run; with
--quick: tiny models and sizes).

Usage:
  bash bench/accelerator.sh                              # full sizes, < 10 min on one GPU
  bash bench/accelerator.sh --out /tmp/acc.md --sections embedder,ldm
  bash bench/accelerator.sh --allow-cpu --quick --out /tmp/acc_smoke.md   # CPU smoke run
"""

import os

# Before JAX starts: grow device memory on demand rather than taking 75% of it at start,
# so that the torch anchors' process finds memory on the same device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(BENCH, "..")
sys.path[:0] = [BENCH, ROOT]

import benchlib  # noqa: E402

# The torch anchors run right after the works they anchor (a time budget that runs out
# skips the later sections, never the anchors of what was measured).
SECTIONS = ("embedder", "ldm", "torch", "embed", "ssim")
DTYPES = ("float32", "bfloat16")
# option: (full size, --quick size)
SIZES = {
    "model": ("convnext_base", "convnext_atto"), "fwd_batch": (64, 4), "train_pairs": (32, 2),
    "embed_n": (4096, 16), "embed_batch": (256, 8), "job_n": (192, 16),
    "unet": ("DiffusionModelUNet_ref", "DiffusionModelUNet_tiny"), "unet_batch": (8, 2),
    "ddim_steps": (50, 3), "ssim_n": (1024, 8), "reps": (10, 2), "ddim_reps": (3, 2),
    "matmul_n": (8192, 256)}
IMAGE_SIZE = (136, 112)


class NoAccelerator(SystemExit):
  pass


def out_of_time(ctx: dict, page: "Page", section: str, what: str) -> bool:
  """True (and a note naming `what`) once the run's --budget_s has passed: the works of a
  section check it between them, so the run ends near its budget."""
  if time.perf_counter() < ctx["deadline"]:
    return False
  page.note(section, f"skipped (time budget): {what}")
  return True


# ----------------------------------------------------------------------------- timing


def timed(fn, reps: int) -> dict:
  """{"first": seconds of the first call (compiles), "median": median of `reps` more}."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {"first": first, "median": benchlib.median(times)}


def matmul_tflops(n: int, dtype, reps: int) -> float:
  """A dense n x n matmul's FLOP/s in `dtype` (TFLOP/s), the share column's anchor."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
  f = jax.jit(lambda x, y: x @ y)
  t = timed(lambda: jax.block_until_ready(f(a, a)), max(reps, 3))
  return 2.0 * n ** 3 / t["median"] / 1e12


def cost_flops(jitted, *args) -> float:
  """FLOPs XLA counts for a program before its own optimisation passes (nan if none). The
  first GPU run (JAX 0.11.2, H200) gave none from the GPU lowering, so the same program is
  then lowered for the CPU platform (only counted there, never run)."""
  def flops(lower):
    try:
      cost = lower().cost_analysis()
    except Exception:  # pylint: disable=broad-except
      return float("nan")
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))
  n = flops(lambda: jitted.lower(*args))
  if math.isnan(n):
    n = flops(lambda: jitted.trace(*args).lower(lowering_platforms=("cpu",)))
  return n


class Page:
  """The rows of the run, by section, and what it prints and writes."""

  def __init__(self):
    self.rows, self.notes, self.status = {}, {}, {}

  def add(self, section: str, work: str, dtype: str, seconds: float, items: float, unit: str,
          first: float = float("nan"), flops: float = float("nan"), note: str = "") -> dict:
    r = {"work": work, "dtype": dtype, "seconds": seconds, "items": items, "unit": unit,
         "first": first, "flops": flops, "note": note}
    self.rows.setdefault(section, []).append(r)
    print(f"  {work} [{dtype}]: {items / seconds:,.1f} {unit}/s ({1e3 * seconds:.2f} ms per "
          f"{items:g}; first call {first:.1f} s){' ' + note if note else ''}", flush=True)
    return r

  def note(self, section: str, text: str) -> None:
    self.notes.setdefault(section, []).append(text)
    print(f"  note: {text}", flush=True)


# ----------------------------------------------------------------------------- sections


def section_device(args, page: Page, ctx: dict) -> None:
  import jax
  import jax.numpy as jnp
  ctx["tflops"] = {dt: matmul_tflops(args.matmul_n, getattr(jnp, dt), args.reps)
                   for dt in DTYPES}
  for dt in DTYPES:
    page.note("device", f"{args.matmul_n}^2 {dt} matmul: {ctx['tflops'][dt]:,.1f} TFLOP/s")
  page.note("device", "JAX default matmul precision: "
            f"{jax.config.jax_default_matmul_precision or 'DEFAULT (TF32 allowed on GPUs)'}")


def _share(r: dict, ctx: dict) -> str:
  tf = ctx.get("tflops", {}).get(r["dtype"])
  if not tf or not math.isfinite(r["flops"]):
    return "-"
  return benchlib.fmt_pct(r["flops"] * r["items"] / r["seconds"] / 1e12 / tf)


def section_embedder(args, page: Page, ctx: dict) -> None:
  import jax
  import jax.numpy as jnp
  import bench_embedder as be
  from deepssim_jax import depthwise, models
  rng = np.random.default_rng(0)
  h, w = IMAGE_SIZE
  x = jnp.asarray(rng.standard_normal((args.fwd_batch, h, w), np.float32))
  xa = jnp.asarray(rng.standard_normal((args.train_pairs, h, w), np.float32))
  xb = jnp.asarray(rng.standard_normal((args.train_pairs, h, w), np.float32))
  ssim = jnp.asarray(rng.uniform(0, 1, args.train_pairs).astype(np.float32))
  key = jax.random.key(0)
  backend = jax.default_backend()
  resolved = {p: depthwise.auto_impl(p, backend) for p in (34 * 28, 17 * 14, 8 * 7, 4 * 3)}
  page.note("embedder", f"depthwise_impl auto on {backend}, by stage map size (positions): "
            + ", ".join(f"{p}: {impl}" for p, impl in resolved.items()))

  def build(impl, dtype):
    model = models.make_model(args.model, depthwise_impl=impl, drop_path_rate=0.5,
                              hidden_dim=be.HIDDEN, embed_dim=be.EMBED, dropout=be.DROPOUT,
                              dtype=dtype)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x[:1])
    return model, variables

  conv, variables = build("conv", "float32")
  params, stats = variables["params"], variables["batch_stats"]
  labels = be.labels_for(params, "ref")
  fwd_flops = cost_flops(jax.jit(lambda v, x: conv.apply(v, x, train=False)), variables, x)
  tx, step = be.make_train_step(conv, labels)
  train_flops = cost_flops(jax.jit(step), params, stats, jax.eval_shape(tx.init, params), xa,
                           xb, ssim, key)
  losses = {}
  for impl in args.impls.split(","):
    for dt in DTYPES:
      if out_of_time(ctx, page, "embedder", f"depthwise {impl}, {dt}"):
        continue
      model, variables = build(impl, dt)
      fwd = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
      t = timed(lambda: jax.block_until_ready(fwd(variables, x)), args.reps)
      if impl == "auto":
        ctx.setdefault("ours", {})[("forward", dt)] = t["median"] / args.fwd_batch
      page.add("embedder", f"{args.model} forward, eval, batch {args.fwd_batch}, "
               f"{h}x{w}, depthwise {impl}", dt, t["median"], args.fwd_batch, "img",
               t["first"], fwd_flops / args.fwd_batch)
      tx, step = be.make_train_step(model, labels)
      opt_state = tx.init(params)
      stepj = jax.jit(step)  # no donation: every call starts from the same state
      out = {}

      def run():
        out["r"] = jax.block_until_ready(stepj(params, stats, opt_state, xa, xb, ssim, key))
      t = timed(run, args.reps)
      new_params, _, new_opt, loss = out["r"]
      if impl == "auto":
        ctx.setdefault("ours", {})[("train/ref", dt)] = t["median"] / args.train_pairs
      floats = [a.dtype for a in jax.tree.leaves((new_params, new_opt))
                if jnp.issubdtype(a.dtype, jnp.floating)]
      f32 = all(d == jnp.float32 for d in floats)
      losses[(impl, dt)] = float(loss)
      page.add("embedder", f"{args.model} Siamese train step, {args.train_pairs} pairs "
               f"(one batch of {2 * args.train_pairs}), freeze ref, depthwise {impl}", dt,
               t["median"], args.train_pairs, "pairs", t["first"],
               train_flops / args.train_pairs,
               note=f"loss {float(loss):.5f} ({loss.dtype}); params and optimizer state "
                    f"{'float32' if f32 else 'NOT all float32'}")
  for impl in args.impls.split(","):
    if (impl, "bfloat16") in losses and (impl, "float32") in losses:
      gap = abs(losses[(impl, "bfloat16")] - losses[(impl, "float32")])
      page.note("embedder", f"train-step loss, same weights and batch, depthwise {impl}: "
                f"|bf16 - f32| = {gap:.2e}")


def section_embed(args, page: Page, ctx: dict) -> None:
  import jax
  import bench_embed_job as bj
  from deepssim_jax import embed, models, parallel
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(1)
  x = rng.standard_normal((args.embed_n, *IMAGE_SIZE)).astype(np.float32)
  conv = models.make_model(args.model, depthwise_impl="conv")
  fwd_flops = cost_flops(jax.jit(lambda v, x: conv.apply(v, x, train=False)),
                         jax.eval_shape(functools.partial(conv.init, train=False),
                                        jax.random.key(0), x[:1]), x[:1])
  tmp = tempfile.mkdtemp(prefix="bench_acc_embed_")
  try:
    src = bj.nifti_source(args.job_n, IMAGE_SIZE)
    emb = {}
    for dt in DTYPES:
      if out_of_time(ctx, page, "embed", dt):
        continue
      model = models.make_model(args.model, dtype=dt)
      variables = jax.jit(functools.partial(model.init, train=False))(
          jax.random.key(0), x[:1])
      embed_fn = embed.make_embed_fn(model)
      out = {}

      def run():
        out["e"] = embed.embed_array(model, variables, x, args.embed_batch, mesh,
                                     progress=False, embed_fn=embed_fn)
      t = timed(run, max(1, args.reps // 3))
      emb[dt] = out["e"]
      page.add("embed", f"{args.model} embedding in memory (embed_array), {args.embed_n} "
               f"images, batch {args.embed_batch}", dt, t["median"], args.embed_n, "img",
               t["first"], fwd_flops, note=f"output {out['e'].dtype}")
      r = embed.embed_to_store(embed_fn, variables, src, os.path.join(tmp, dt),
                               batch_size=args.embed_batch, shard_rows=4096,
                               fingerprint=dt, mesh=mesh, num_threads=8, prefetch=16,
                               progress=False)
      page.add("embed", f"{args.model} embedding job (NIfTI slices read + resampled by grain "
               f"threads, forward, store), {r['n']} images, batch {args.embed_batch}", dt,
               r["n"] / r["images_per_s"], r["n"], "img", float("nan"), fwd_flops,
               note=f"{100 * r['input_wait_fraction']:.0f}% of the time waiting on input")
    if len(emb) < 2:
      return
    e32, e16 = emb["float32"], emb["bfloat16"]
    cos_diff = np.abs(e16[:256] @ e16[:256].T - e32[:256] @ e32[:256].T).max()
    page.note("embed", "random weights, random images: max |cos_bf16 - cos_f32| over the "
              f"first 256 x 256 pairs {cos_diff:.2e}, "
              f"max | |e_bf16| - 1 | {np.abs(np.linalg.norm(e16, axis=1) - 1).max():.1e}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def ldm_configs(args):
  """(diffusion config, latent shape (h, w, c), context width) as bench_ldm.py sets them."""
  import bench_ldm as bl
  from ldm_jax import input_pipeline, train_autoencoder
  acfg, dcfg = bl.load_config("ldm_ixi_autoencoder"), bl.load_config("ldm_ixi_diffusion")
  dcfg.model.name = args.unet
  dcfg.train.batch_size = args.unet_batch
  ae = train_autoencoder.make_autoencoder(acfg.model)
  f = 2 ** (len(ae.channels) - 1)
  m = dcfg.latent.pad_multiple
  lh, lw = (math.ceil(s / f / m) * m for s in acfg.data.image_size)
  ctx_dim = 0 if dcfg.cond.kind == "none" else len(input_pipeline.COVARIATES)
  return dcfg, (lh, lw, ae.latent_channels), ctx_dim


def section_ldm(args, page: Page, ctx: dict) -> None:
  import jax
  import jax.numpy as jnp
  from ldm_jax import diffusion, train_diffusion
  dcfg, (lh, lw, lc), ctx_dim = ldm_configs(args)
  shape = (args.unet_batch, lh, lw, lc)
  schedule = train_diffusion.make_schedule(dcfg)
  batch = {"mu": jax.random.normal(jax.random.key(2), shape), "sigma": jnp.zeros(shape)}
  context = jax.random.normal(jax.random.key(5), (args.unet_batch, 1, ctx_dim)) if ctx_dim else None
  if context is not None:
    batch["context"] = context
  x_T = jax.random.normal(jax.random.key(4), shape)
  what = (f"{args.unet} (cond {dcfg.cond.kind}), batch {args.unet_batch} of latents "
          f"{lc}x{lh}x{lw}")
  flops = {}
  for dt in DTYPES:
    if out_of_time(ctx, page, "ldm", dt):
      continue
    dcfg.train.mixed_precision = dt == "bfloat16"
    model = train_diffusion.make_unet(dcfg, lc, ctx_dim or None)
    state = train_diffusion.create_state(dcfg, model, (lh, lw, lc), jax.random.key(0),
                                         cross_attention_dim=ctx_dim or None)
    step = train_diffusion.make_train_step(dcfg, schedule)
    if "unet" not in flops:
      flops["unet"] = cost_flops(step, state, batch, jax.random.key(3))
    holder = {"state": state}

    def run_step():
      holder["state"], metrics = step(holder["state"], batch, jax.random.key(3))
      holder["loss"] = jax.block_until_ready(metrics)["loss"]
    t = timed(run_step, args.reps)
    ctx.setdefault("ours", {})[("unet", dt)] = t["median"]
    page.add("ldm", f"UNet train step, {what}", dt, t["median"], 1, "steps", t["first"],
             flops["unet"], note=f"loss dtype {holder['loss'].dtype}")
    apply = train_diffusion.make_apply(model)
    sample = jax.jit(lambda prm, x, c: diffusion.ddim_sample(
        apply, prm, schedule, shape, jax.random.key(0), num_inference_steps=args.ddim_steps,
        eta=dcfg.sample.eta, context=c, x_T=x))
    if "ddim" not in flops:
      one = jax.jit(lambda prm, x, c: apply(prm, x, jnp.zeros((args.unet_batch,), jnp.int32), c))
      flops["ddim"] = args.ddim_steps * cost_flops(one, holder["state"].params, x_T, context)
    out = {}

    def run_ddim():
      out["z"] = jax.block_until_ready(sample(holder["state"].params, x_T, context))
    t = timed(run_ddim, args.ddim_reps)
    ctx.setdefault("ours", {})[("ddim", dt)] = t["median"] / args.unet_batch
    page.add("ldm", f"DDIM sampling, {args.ddim_steps} steps, {what}", dt, t["median"],
             args.unet_batch, "samples", t["first"], flops["ddim"] / args.unet_batch,
             note=f"output {out['z'].dtype}, "
             f"finite {bool(np.isfinite(np.asarray(out['z'])).all())}")


def section_ssim(args, page: Page, ctx: dict) -> None:
  import jax
  import jax.numpy as jnp
  from deepssim_jax import ssim as S
  rng = np.random.default_rng(3)
  z = rng.standard_normal((args.ssim_n, *IMAGE_SIZE)).astype(np.float32)
  za = jnp.asarray((z - z.mean((1, 2), keepdims=True)) / z.std((1, 2), keepdims=True))
  zb = za[::-1]
  for blocks in ((4, 16), (32, 64)):
    fn = jax.jit(functools.partial(S.ssim_all_pairs, block_a=blocks[0], block_b=blocks[1]))
    t = timed(lambda: jax.block_until_ready(fn(za, zb)), max(1, args.reps // 3))
    page.add("ssim", f"ssim_all_pairs {args.ssim_n}x{args.ssim_n}, blocks {blocks}",
             "float32", t["median"], args.ssim_n ** 2, "pairs", t["first"])


# ----------------------------------------------------------------------------- torch


def torch_worker(spec: dict):
  """The worker's works (benchlib.serve): bench_embedder.py's or bench_ldm.py's torch side
  on spec["device"], each work once per dtype (bfloat16 under torch.autocast), each call
  synchronised."""
  import torch
  dev = spec["device"]
  if dev == "cuda":
    if not torch.cuda.is_available():
      raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default precision on GPUs
    torch.backends.cudnn.allow_tf32 = True
  torch.set_default_device(dev)
  if spec["kind"] == "embedder":
    import bench_embedder
    # its inputs are drawn on the device (a torch.Generator of that device)
    works, info = bench_embedder.torch_side({**spec["spec"], "device": dev})
  else:
    import bench_ldm
    works, info = bench_ldm.torch_side(spec["spec"])

  def wrap(fn, dt):
    def run():
      if dt == "bfloat16":
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
          fn()
      else:
        fn()
      if dev == "cuda":
        torch.cuda.synchronize()
    return run
  out = {f"{name}|{dt}": wrap(fn, dt) for name, fn in works.items() for dt in DTYPES}
  where = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
  info["impl"] = f"{info['impl']} on {where}"
  return out, info


def section_torch(args, page: Page, ctx: dict) -> None:
  import jax
  on_cpu = jax.default_backend() == "cpu"
  dev = "cpu" if on_cpu else "cuda"
  if on_cpu:
    page.note("torch", "CPU run (--allow-cpu): the torch side runs on the CPU, a smoke test "
              "of its code path, not an accelerator anchor")
  from deepssim_jax import models
  arch = models.MODELS[args.model].keywords
  base = {"model": args.model, "dims": list(arch["dims"]), "depths": list(arch["depths"]),
          "size": list(IMAGE_SIZE), "threads": benchlib.cores(), "drop_path": 0.5,
          "malloc_tuning": False}
  jobs = [("embedder", dict(base, batch=args.fwd_batch, passes=["forward"], freezes=[]),
           {"forward": (f"{args.model} forward, eval, batch {args.fwd_batch}",
                        args.fwd_batch, "img")}),
          ("embedder", dict(base, batch=args.train_pairs, passes=["train"], freezes=["ref"]),
           {"train/ref": (f"{args.model} Siamese train step, {args.train_pairs} pairs "
                          "(two branch calls), freeze ref", args.train_pairs, "pairs")})]
  if "ldm" in args.sections:
    from ldm_jax import convert, train_diffusion
    dcfg, (lh, lw, lc), ctx_dim = ldm_configs(args)
    unet = train_diffusion.make_unet(dcfg, lc, ctx_dim or None)
    s, o = dcfg.schedule, dcfg.optim
    spec = {"threads": benchlib.cores(), "unet": {
        "kwargs": convert.monai_kwargs("unet", unet), "shape": [args.unet_batch, lc, lh, lw],
        "context_dim": ctx_dim, "ddim_steps": args.ddim_steps, "eta": dcfg.sample.eta,
        "schedule": {"num_steps": s.num_steps, "kind": s.kind, "beta_start": s.beta_start,
                     "beta_end": s.beta_end},
        "optim": {"lr": o.learning_rate, "b1": o.b1, "b2": o.b2, "eps": o.eps,
                  "weight_decay": o.weight_decay}}}
    jobs.append(("ldm", spec, {
        "unet": (f"MONAI UNet train step, batch {args.unet_batch}", 1, "steps"),
        "ddim": (f"MONAI DDIM sampling, {args.ddim_steps} steps, batch {args.unet_batch}",
                 args.unet_batch, "samples")}))
  for kind, spec, works in jobs:
    if out_of_time(ctx, page, "torch", f"{kind} {', '.join(works)}"):
      continue
    try:
      worker = benchlib.Worker(__file__, {"kind": kind, "device": dev, "spec": spec})
    except RuntimeError as e:
      page.note("torch", f"{kind}: torch side unavailable ({e}); no anchor")
      continue
    try:
      page.note("torch", f"{kind} ({', '.join(works)}): {worker.info['impl']}")
      for name, (work, items, unit) in works.items():
        for dt in DTYPES:
          timer = worker.timer(f"{name}|{dt}")
          first = timer()
          median = benchlib.median([timer() for _ in range(
              args.ddim_reps if name == "ddim" else args.reps)])
          ours = ctx.get("ours", {}).get((name, dt))
          page.add("torch", work + (" (torch.autocast)" if dt == "bfloat16" else ""), dt,
                   median, items, unit, first,
                   note="" if ours is None else f"ours {median / items / ours:.2f}x its rate")
    finally:
      worker.close()


# ----------------------------------------------------------------------------- page


def markdown(args, page: Page, facts: dict, started, seconds: float) -> str:
  smoke = facts["backend"] == "cpu" or args.quick
  lines = [
      "# Accelerator benchmark: float32 and bfloat16 compute",
      "",
      f"Generated by `bash bench/accelerator.sh {' '.join(sys.argv[1:])}` on "
      f"{started:%Y-%m-%d %H:%M} UTC in {seconds:.0f} s: do not edit; rerun it."
      + (" **A smoke run (CPU or --quick sizes): not a measurement.**" if smoke else ""),
      "",
      f"- Device: {facts['device']} x {facts['count']} (JAX backend {facts['backend']}); "
      f"JAX {facts['jax']}, jaxlib {facts['jaxlib']}; host {os.cpu_count()} CPUs.",
      "- Each row: the median of repeated calls after one untimed first call (its time, "
      "mostly compilation, in the last column). share = FLOP/s of the work (as XLA counts "
      "it for the plain formulation) over a dense matmul's in the same dtype, timed in this "
      "run. bf16/f32 = float32 time over bfloat16 time (> 1: bfloat16 is faster).",
      ""]
  for section in ("device",) + SECTIONS:
    if section not in page.rows and section not in page.notes and section not in page.status:
      continue
    lines += [f"## {section}", ""]
    if page.status.get(section):
      lines += [page.status[section], ""]
    rows = page.rows.get(section, [])
    if rows:
      f32 = {r["work"]: r for r in rows if r["dtype"] == "float32"}
      lines += ["| work | dtype | rate | time per call | bf16/f32 | share | first call |",
                "|---|---|---|---|---|---|---|"]
      for r in rows:
        base = f32.get(r["work"].replace(" (torch.autocast)", ""))
        speedup = (f"{base['seconds'] / r['seconds']:.2f}x" if base is not None
                   and r["dtype"] == "bfloat16" else "")
        work = r["work"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {work} | {r['dtype']} | "
                     f"{benchlib.fmt_side(r['seconds'], r['items'], r['unit'])} | "
                     f"{1e3 * r['seconds']:.2f} ms | {speedup} | {_share(r, facts)} | "
                     + (f"{r['first']:.1f} s |" if math.isfinite(r["first"]) else "- |"))
      lines.append("")
    for n in page.notes.get(section, []):
      lines.append(f"- {n}")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(BENCH, "ACCELERATOR.md"))
  ap.add_argument("--allow-cpu", dest="allow_cpu", action="store_true",
                  help="run on the CPU when no accelerator is present (a smoke run)")
  ap.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke run)")
  ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
  ap.add_argument("--impls", default=None, help="depthwise_impl forms of the embedder rows; "
                  "default auto on an accelerator (the grouped convolution there), "
                  "auto,conv on CPU")
  ap.add_argument("--budget_s", type=float, default=480.0,
                  help="works not begun by then are skipped, named in the page (the run "
                  "stays under 10 minutes)")
  for name, (full, _) in SIZES.items():
    ap.add_argument("--" + name, type=type(full), default=None)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return benchlib.serve(lambda: torch_worker(json.loads(args.worker)))
  for name, (full, quick) in SIZES.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)
  args.sections = [s for s in args.sections.split(",") if s]
  if set(args.sections) - set(SECTIONS):
    raise SystemExit(f"--sections: unknown {sorted(set(args.sections) - set(SECTIONS))}; "
                     f"choose from {SECTIONS}")

  t0 = time.perf_counter()
  started = datetime.datetime.now(datetime.timezone.utc)
  import jax
  import jaxlib
  dev = jax.devices()[0]
  facts = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
           "count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
  print(f"device: {facts['device']} x {facts['count']} (backend {facts['backend']}), "
        f"JAX {facts['jax']}", flush=True)
  if facts["backend"] == "cpu" and not args.allow_cpu:
    raise NoAccelerator(
        "bench_accelerator: no accelerator: JAX sees only CPU devices (backend 'cpu'). Run it "
        "on a machine with a GPU/TPU and a JAX built for it (e.g. pip install "
        "'jax[cuda12]'); check with python -c 'import jax; print(jax.devices())'. "
        "--allow-cpu runs it on the CPU as a smoke test (add --quick for tiny sizes).")
  if args.impls is None:
    args.impls = "auto,conv" if facts["backend"] == "cpu" else "auto"
  facts["deadline"] = t0 + args.budget_s
  page = Page()
  fns = {"embedder": section_embedder, "embed": section_embed, "ldm": section_ldm,
         "ssim": section_ssim, "torch": section_torch}
  failed = []
  for section in ("device", *args.sections):
    if section != "device" and time.perf_counter() - t0 > args.budget_s:
      page.status[section] = f"Skipped: the run had used its --budget_s={args.budget_s:g} s."
      print(f"== {section}: skipped (time budget)", flush=True)
      continue
    print(f"== {section}", flush=True)
    ts = time.perf_counter()
    try:
      (section_device if section == "device" else fns[section])(args, page, facts)
      page.status[section] = f"{time.perf_counter() - ts:.0f} s."
    except Exception as e:  # pylint: disable=broad-except  # the other sections still run
      traceback.print_exc()
      failed.append(section)
      page.status[section] = (f"**Failed** after {time.perf_counter() - ts:.0f} s: "
                              f"{type(e).__name__}: {e}")
  seconds = time.perf_counter() - t0
  text = markdown(args, page, facts, started, seconds)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  print("\n" + text + f"\nwritten to {args.out} ({seconds:.0f} s)", flush=True)
  if failed:
    raise SystemExit(f"failed sections: {failed}")


if __name__ == "__main__":
  main()
