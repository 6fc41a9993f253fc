"""Benchmark: the LDM's steps side by side with MONAI's networks in the same run.

The settings are the project's configs of the reference's LDM (brAIn-science/DeepSSIM's
scripts/ldm_train_vae.py, ldm_train_diff.py and src/diffusion/networks.py, built on MONAI):
configs/ldm_ixi_autoencoder.py and configs/ldm_ixi_diffusion.py. Theirs are MONAI's torch
networks built with the same constructor arguments (ldm_jax.convert.monai_kwargs of our
modules, as tests/test_ldm_parity.py checks), torch eager, float32, in their own process with
torch.set_num_threads(cores), the number of cores XLA:CPU's pool uses (both printed).
Weights are random on both sides (timing does not depend on them).

Works (one row each):
  autoencoder step  AutoencoderKL_ref + PatchDiscriminator_ref, a batch of the config's
                    size (16 images 1 x 136 x 112): generator loss L1 + KL + least-squares
                    adversarial, backward, Adam; then the discriminator on the detached
                    reconstruction and the images, backward, Adam (the reference's step
                    without the perceptual term, on both sides: its LPIPS-squeeze needs
                    ImageNet weights; ours: ldm_jax.train_autoencoder.train_step with
                    loss.perceptual="none").
  UNet train step   DiffusionModelUNet_ref (conditioned by cross-attention on the 6
                    covariates, as configs/ldm_ixi_diffusion.py: 261.8M parameters;
                    --cond=none: 184.0M) on a batch of 8 latents
                    3 x 36 x 28: noise, random timesteps, q_sample (MONAI's DDPMScheduler
                    add_noise), noise-prediction MSE, backward, AdamW
                    (ldm_jax.train_diffusion.train_step; torch.optim.AdamW).
  DDIM sampling     N steps (the config's 50), eta 0, of the same batch of latents: ours one
                    compiled lax.scan (ldm_jax.diffusion.ddim_sample); theirs N UNet
                    forwards and monai.networks.schedulers.DDIMScheduler.step under
                    torch.inference_mode.

FLOPs (for the share of the same-run matmul rate): what XLA counts for our program before its
optimisation passes; DDIM: N x one UNet forward. Memory: both sides are alive at once;
`/usr/bin/time -v` gives the peak of ours only.

Usage:
  nice -n 5 python bench/bench_ldm.py                   # 5 reps (DDIM 3), the configs' sizes
  python bench/bench_ldm.py --quick                      # tiny networks, batch 2, 3 DDIM steps
  python bench/bench_ldm.py --works=unet,ddim --ddim_steps 5 --json=/tmp/ldm.json
"""

import argparse
import importlib.util
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import benchlib  # noqa: E402

WORKS = ("ae", "unet", "ddim")
MONAI_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta",
                   "cosine": "cosine"}


def load_config(name: str):
  """get_config() of configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                   name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


# ----------------------------------------------------------------------------- theirs


def torch_side(spec: dict):
  """The worker's works: MONAI's networks and steps (module docstring)."""
  import torch
  import torch.nn.functional as F
  import monai
  from monai.networks import nets
  from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  works, params = {}, {}

  if "ae" in spec:
    a = spec["ae"]
    disc_kw = dict(a["disc_kwargs"])
    disc_kw["activation"] = tuple(disc_kw["activation"])
    ae, disc = nets.AutoencoderKL(**a["ae_kwargs"]), nets.PatchDiscriminator(**disc_kw)
    params["ae"] = sum(p.numel() for p in ae.parameters())
    params["disc"] = sum(p.numel() for p in disc.parameters())
    x = torch.rand(a["shape"])
    o, w = a["optim"], a["loss"]
    opt_g = torch.optim.Adam(ae.parameters(), o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
    opt_d = torch.optim.Adam(disc.parameters(), o["d_lr"], betas=(o["b1"], o["b2"]),
                             eps=o["eps"])

    def ae_step():
      ae.train()
      disc.train()
      opt_g.zero_grad(set_to_none=True)
      recon, z_mu, z_sigma = ae(x)
      logits = disc(recon.contiguous())[-1]
      var = z_sigma.pow(2)
      kl = torch.mean(0.5 * torch.sum(z_mu.pow(2) + var - torch.log(var) - 1,
                                      dim=list(range(1, z_mu.ndim))))
      loss_g = (w["l1"] * F.l1_loss(recon, x) + w["kl"] * kl
                + w["adv"] * F.mse_loss(logits, torch.ones_like(logits)))
      loss_g.backward()
      opt_g.step()
      opt_d.zero_grad(set_to_none=True)
      fake = disc(recon.detach().contiguous())[-1]
      real = disc(x)[-1]
      loss_d = w["adv"] * 0.5 * (F.mse_loss(fake, torch.zeros_like(fake))
                                 + F.mse_loss(real, torch.ones_like(real)))
      loss_d.backward()
      opt_d.step()
    works["ae"] = ae_step

  if "unet" in spec:
    u = spec["unet"]
    net = nets.DiffusionModelUNet(**u["kwargs"])
    params["unet"] = sum(p.numel() for p in net.parameters())
    b = u["shape"][0]
    x0 = torch.randn(u["shape"])
    ctx = torch.randn((b, 1, u["context_dim"])) if u["context_dim"] else None
    s = u["schedule"]
    sched_kw = dict(num_train_timesteps=s["num_steps"], schedule=MONAI_SCHEDULES[s["kind"]],
                    beta_start=s["beta_start"], beta_end=s["beta_end"])
    ddpm = DDPMScheduler(**sched_kw)
    o = u["optim"]
    opt = torch.optim.AdamW(net.parameters(), o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])

    def unet_step():
      net.train()
      opt.zero_grad(set_to_none=True)
      noise = torch.randn_like(x0)
      t = torch.randint(0, s["num_steps"], (b,))
      x_t = ddpm.add_noise(original_samples=x0, noise=noise, timesteps=t)
      F.mse_loss(net(x_t, t, ctx).float(), noise).backward()
      opt.step()

    ddim = DDIMScheduler(**sched_kw, clip_sample=False)
    ddim.set_timesteps(u["ddim_steps"])

    def sample():
      net.eval()
      z = torch.randn(u["shape"])
      with torch.inference_mode():
        for t in ddim.timesteps:
          eps = net(z, torch.full((b,), int(t)), ctx)
          z, _ = ddim.step(eps, t, z, eta=u["eta"])
    works["unet"], works["ddim"] = unet_step, sample

  info = {"impl": f"MONAI {monai.__version__}, torch {torch.__version__} eager, "
                  f"{torch.get_num_threads()} threads",
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "monai": monai.__version__, "params": params}
  return works, info


# ----------------------------------------------------------------------------- ours


def setup(quick: bool, ae_batch: int = None, batch: int = None, cond: str = None) -> dict:
  """The benchmark's LDM: configs (configs/ldm_ixi_*.py, or the tiny networks with --quick),
  batch sizes, no perceptual term, the networks, the padded latent shape (e.g. 34 x 28 ->
  36 x 28) and the context width. Also profile_cpu.py's."""
  from ldm_jax import input_pipeline, train_autoencoder, train_diffusion
  acfg, dcfg = load_config("ldm_ixi_autoencoder"), load_config("ldm_ixi_diffusion")
  if quick:
    acfg.model.name, acfg.disc.name = "AutoencoderKL_tiny", "PatchDiscriminator_tiny"
    dcfg.model.name = "DiffusionModelUNet_tiny"
  acfg.train.batch_size = acfg.train.effective_batch_size = (
      ae_batch or (2 if quick else acfg.train.batch_size))
  acfg.loss.perceptual, acfg.loss.perceptual_kwargs = "none", {}
  dcfg.cond.kind = cond or dcfg.cond.kind
  dcfg.train.batch_size = batch or (2 if quick else dcfg.train.batch_size)
  ae_model = train_autoencoder.make_autoencoder(acfg.model)
  ih, iw = acfg.data.image_size
  f = 2 ** (len(ae_model.channels) - 1)
  m = dcfg.latent.pad_multiple
  lh, lw = (math.ceil(s / f / m) * m for s in (ih, iw))
  context_dim = 0 if dcfg.cond.kind == "none" else len(input_pipeline.COVARIATES)
  return {"acfg": acfg, "dcfg": dcfg, "ae_model": ae_model,
          "disc_model": train_autoencoder.make_discriminator(acfg.disc),
          "unet_model": train_diffusion.make_unet(dcfg, ae_model.latent_channels,
                                                  context_dim or None),
          "latent_shape": (lh, lw, ae_model.latent_channels), "context_dim": context_dim}


def flops_of(jitted, *args) -> float:
  """FLOPs XLA counts for the program before its own optimisation passes."""
  cost = jitted.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--works", default=",".join(WORKS), help=f"comma list of {WORKS}")
  p.add_argument("--ae_batch", type=int, default=None,
                 help="default: the autoencoder config's train.batch_size; --quick 2")
  p.add_argument("--batch", type=int, default=None,
                 help="UNet batch; default: the diffusion config's train.batch_size; --quick 2")
  p.add_argument("--reps", type=int, default=None, help="default 5, --quick 2")
  p.add_argument("--ddim_reps", type=int, default=None, help="default 3, --quick 2")
  p.add_argument("--ddim_steps", type=int, default=None,
                 help="default: the config's sample.num_inference_steps; --quick 3")
  p.add_argument("--cond", default=None, choices=("none", "covariates"),
                 help="UNet conditioning; default: the diffusion config's (covariates)")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  benchlib.add_args(p)
  args = p.parse_args(argv)
  if args.worker:
    return benchlib.serve(lambda: torch_side(json.loads(args.worker)))

  import jax
  import jax.numpy as jnp
  from ldm_jax import convert, diffusion, train_autoencoder, train_diffusion

  works = [w for w in args.works.split(",") if w]
  if set(works) - set(WORKS):
    raise SystemExit(f"--works: unknown {sorted(set(works) - set(WORKS))}; choose from {WORKS}")
  quick = args.quick
  reps = args.reps or (2 if quick else 5)
  ddim_reps = args.ddim_reps or (2 if quick else 3)
  su = setup(quick, args.ae_batch, args.batch, args.cond)
  acfg, dcfg, ae_model, disc_model, unet_model = (
      su[k] for k in ("acfg", "dcfg", "ae_model", "disc_model", "unet_model"))
  ih, iw = acfg.data.image_size
  lh, lw, lc = su["latent_shape"]
  bsz, ae_bsz, context_dim = dcfg.train.batch_size, acfg.train.batch_size, su["context_dim"]
  n_ddim = args.ddim_steps or (3 if quick else dcfg.sample.num_inference_steps)
  s = dcfg.schedule
  spec = {"threads": benchlib.cores()}
  if "ae" in works:
    o = acfg.optim
    spec["ae"] = {
        "ae_kwargs": convert.monai_kwargs("autoencoder", ae_model),
        "disc_kwargs": convert.monai_kwargs("discriminator", disc_model),
        "shape": [ae_bsz, 1, ih, iw],
        "optim": {"lr": o.learning_rate, "d_lr": o.d_learning_rate, "b1": o.b1, "b2": o.b2,
                  "eps": o.eps},
        "loss": {"l1": acfg.loss.l1_weight, "kl": acfg.loss.kl_weight,
                 "adv": acfg.loss.adv_weight}}
  if "unet" in works or "ddim" in works:
    o = dcfg.optim
    spec["unet"] = {
        "kwargs": convert.monai_kwargs("unet", unet_model), "shape": [bsz, lc, lh, lw],
        "context_dim": context_dim, "ddim_steps": n_ddim, "eta": dcfg.sample.eta,
        "schedule": {"num_steps": s.num_steps, "kind": s.kind, "beta_start": s.beta_start,
                     "beta_end": s.beta_end},
        "optim": {"lr": o.learning_rate, "b1": o.b1, "b2": o.b2, "eps": o.eps,
                  "weight_decay": o.weight_decay}}
  theirs = benchlib.Worker(__file__, spec)
  print(f"# {jax.devices()[0].device_kind} x {jax.device_count()}, JAX {jax.__version__}; "
        f"threads: jax (XLA:CPU pool) {benchlib.cores()}, torch {theirs.info['threads']}",
        flush=True)
  anchor = benchlib.MatmulAnchor(args.matmul_n)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  rows = []

  if "ae" in works:
    state = train_autoencoder.create_state(acfg, jax.random.key(0))
    print(f"# autoencoder {count(state['g'].params):,} / discriminator "
          f"{count(state['d'].params):,} parameters (MONAI {theirs.info['params']['ae']:,} / "
          f"{theirs.info['params']['disc']:,})", flush=True)
    step = train_autoencoder.make_train_step(acfg)
    batch = {"image": jax.random.uniform(jax.random.key(1), (ae_bsz, ih, iw, 1))}
    fl = flops_of(step, state, batch, jax.random.key(2))
    holder = {"state": state}

    def ae_step():
      holder["state"], metrics = step(holder["state"], batch, jax.random.key(2))
      jax.block_until_ready(metrics)
    t = benchlib.interleave({"ours": ae_step, "theirs": theirs.timer("ae")}, reps, anchor)
    rows.append(benchlib.row(
        f"autoencoder + discriminator step ({acfg.model.name}, {acfg.disc.name}), batch "
        f"{ae_bsz} of 1x{ih}x{iw}, no perceptual term", benchlib.median(t["ours"]),
        benchlib.median(t["theirs"]), theirs.info["impl"] + " (AutoencoderKL, "
        "PatchDiscriminator)", "steps", flops_per_item=fl, matmul_gflops=anchor.gflops()))
    del holder, state

  if "unet" in works or "ddim" in works:
    schedule = train_diffusion.make_schedule(dcfg)
    state = train_diffusion.create_state(dcfg, unet_model, (lh, lw, lc), jax.random.key(0),
                                         cross_attention_dim=context_dim or None)
    print(f"# UNet {count(state.params):,} parameters (MONAI "
          f"{theirs.info['params']['unet']:,}), cond {dcfg.cond.kind}", flush=True)
    shape = (bsz, lh, lw, lc)
    batch = {"mu": jax.random.normal(jax.random.key(2), shape), "sigma": jnp.zeros(shape)}
    context = None
    if context_dim:
      context = jax.random.normal(jax.random.key(5), (bsz, 1, context_dim))
      batch["context"] = context
    holder = {"state": state}
    what = f"{dcfg.model.name} (cond {dcfg.cond.kind}), batch {bsz} of latents {lc}x{lh}x{lw}"
    impl = theirs.info["impl"] + " (DiffusionModelUNet)"
    if "unet" in works:
      step = train_diffusion.make_train_step(dcfg, schedule)
      fl = flops_of(step, state, batch, jax.random.key(3))

      def unet_step():
        holder["state"], metrics = step(holder["state"], batch, jax.random.key(3))
        jax.block_until_ready(metrics)
      t = benchlib.interleave({"ours": unet_step, "theirs": theirs.timer("unet")}, reps, anchor)
      rows.append(benchlib.row(f"UNet train step, {what}", benchlib.median(t["ours"]),
                               benchlib.median(t["theirs"]), impl, "steps", flops_per_item=fl,
                               matmul_gflops=anchor.gflops()))
    if "ddim" in works:
      apply = train_diffusion.make_apply(unet_model)
      sample = jax.jit(lambda prm, x, c: diffusion.ddim_sample(
          apply, prm, schedule, shape, jax.random.key(0), num_inference_steps=n_ddim,
          eta=dcfg.sample.eta, context=c, x_T=x))
      x_T = jax.random.normal(jax.random.key(4), shape)
      one = jax.jit(lambda prm, x, c: apply(prm, x, jnp.zeros((bsz,), jnp.int32), c))
      fl = n_ddim * flops_of(one, holder["state"].params, x_T, context)
      compiled = sample.lower(holder["state"].params, x_T, context).compile()
      # the train step donates its state: always sample with the current one's params
      run = lambda: jax.block_until_ready(compiled(holder["state"].params, x_T, context))
      # no warm-up (compiled ahead; one run of the full size takes minutes on a CPU)
      t = benchlib.interleave({"ours": run, "theirs": theirs.timer("ddim")}, ddim_reps, anchor,
                              warmup=False)
      rows.append(benchlib.row(f"DDIM sampling, {n_ddim} steps, eta {dcfg.sample.eta:g}, "
                               f"{what}", benchlib.median(t["ours"]),
                               benchlib.median(t["theirs"]),
                               impl.replace(")", " + DDIMScheduler)"), "runs",
                               flops_per_item=fl, matmul_gflops=anchor.gflops()))
    del holder, state
  theirs.close()
  print(f"# medians of {reps} (DDIM {ddim_reps}) interleaved repetitions (matmul "
        f"{args.matmul_n}^2 float32, ours, theirs) after one warm-up each", flush=True)
  benchlib.report("bench_ldm", rows, benchlib.facts(
      torch=theirs.info["torch"], monai=theirs.info["monai"],
      torch_threads=theirs.info["threads"]), args.json)


if __name__ == "__main__":
  main()
