"""Training the second stage: the diffusion UNet on latents of the frozen autoencoder.

The reference's recipe (SPEC section 4): latents of the trained KL autoencoder (3 x 34 x 28
for 136 x 112 slices) zero-padded to multiples of 4 (3 x 36 x 28) for the UNet and cropped
back before decoding; noise-prediction MSE under the scaled-linear 1000-step schedule;
AdamW lr 2.5e-5, batch 8; optional cross-attention conditioning on six covariates (age,
sex, sequence, CSF/WM/GM fractions; ldm_jax/input_pipeline.py); duplication none / low /
high (each unique image repeated k ~ U{1..4} or U{1..14} times, the counts written to
<workdir>/duplication.csv).

The first stage is chosen by name (FIRST_STAGES, a dict of builders returning encode /
decode functions): "kl" restores a trained autoencoder run (autoencoder.workdir); "identity"
diffuses in pixel space (tests and tiny demos). Every training image is encoded once and
cached (<workdir>/latents.npz: posterior mean and standard deviation, padded, multiplied by
the latent scale factor); each step draws z = mu + sigma eps as MONAI's
encode_stage_2_inputs does (latent.sample). The scale factor is latent.scale_factor, or
with 0 (MONAI's tutorials) 1 / std of the cached posterior means.

Jitted `train_step` with the state donated, data-parallel over a Mesh, orbax checkpoints,
resumable (same batches as an uninterrupted run), metrics.csv + loss.png, and DDIM sample
grids (samples/samples-<step>.png, the first records' covariates, fixed noise).
"""

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from deepssim_jax import io, parallel
from deepssim_jax.train import MetricsLog
from ldm_jax import common, diffusion, input_pipeline, unet

UNETS = {"DiffusionModelUNet_ref": unet.DiffusionModelUNet_ref,
         "DiffusionModelUNet_tiny": unet.DiffusionModelUNet_tiny,
         "DiffusionModelUNet": unet.DiffusionModelUNet}


# ----------------------------------------------------------------------------- first stage


def kl_stage(config: ml_collections.ConfigDict, mesh) -> dict:
  """The frozen KL autoencoder of config.autoencoder.workdir."""
  from ldm_jax import train_autoencoder  # pylint: disable=g-import-not-at-top
  model, params, ae_config = train_autoencoder.load_autoencoder(config.autoencoder.workdir, mesh)
  if tuple(ae_config.data.image_size) != tuple(config.data.image_size):
    raise io.InputError(f"{config.autoencoder.workdir}: the autoencoder was trained on "
                        f"{tuple(ae_config.data.image_size)} images, this run reads "
                        f"{tuple(config.data.image_size)}")
  encode = lambda x: model.apply({"params": params}, x, method="encode")
  decode = lambda z: model.apply({"params": params}, z, method="decode")
  return {"encode": encode, "decode": decode, "channels": model.latent_channels,
          "fingerprint": io.fingerprint(config.autoencoder.workdir)}


def identity_stage(config: ml_collections.ConfigDict, mesh) -> dict:
  """Pixel space: the latent is the image (sigma 0)."""
  del config, mesh
  return {"encode": lambda x: (x, jnp.zeros_like(x)), "decode": lambda z: z[..., :1],
          "channels": 1, "fingerprint": "identity"}


FIRST_STAGES = {"kl": kl_stage, "identity": identity_stage}


def first_stage(config, mesh) -> dict:
  kind = config.autoencoder.kind
  if kind not in FIRST_STAGES:
    raise ValueError(f"autoencoder.kind {kind!r}: expected one of {sorted(FIRST_STAGES)}")
  return FIRST_STAGES[kind](config, mesh)


def encode_all(stage: dict, images: np.ndarray, batch_size: int, mesh) -> tuple:
  """(mu, sigma) of every image, (N, h, w, c) numpy, batched and data-parallel."""
  n_dev = mesh.devices.size
  b = -(-batch_size // n_dev) * n_dev
  fn = jax.jit(stage["encode"])
  mus, sigmas = [], []
  for i in range(0, len(images), b):
    chunk = images[i:i + b, ..., None]
    x = parallel.shard_batch(parallel.pad_to(chunk, b)[common.local_rows(b)], mesh)
    mu, sigma = fn(x)
    mus.append(common.to_host(mu)[:len(chunk)])
    sigmas.append(common.to_host(sigma)[:len(chunk)])
  return np.concatenate(mus), np.concatenate(sigmas)


def latents(config: ml_collections.ConfigDict, workdir: str, records: dict, stage: dict,
            mesh) -> dict:
  """The cached latents of the records: dict(mu, sigma (N, H', W', c) padded and scaled,
  hw (unpadded latent size), scale). Encoded once into <workdir>/latents.npz."""
  path = os.path.join(workdir, "latents.npz")
  fp = io.fingerprint(stage["fingerprint"], records["images"], *records["keys"])
  if os.path.exists(path):
    with np.load(path) as z:
      cache = {k: z[k] for k in z.files}
    if str(cache["fingerprint"]) == fp:
      return {"mu": cache["mu"], "sigma": cache["sigma"], "hw": tuple(cache["hw"]),
              "scale": float(cache["scale"])}
    raise io.InputError(f"{path}: cached latents of other images or another autoencoder; "
                        "use a new workdir")
  logging.info("Encoding %d training images", len(records["images"]))
  mu, sigma = encode_all(stage, records["images"], config.train.encode_batch_size, mesh)
  hw = mu.shape[1:3]
  scale = config.latent.scale_factor or 1.0 / max(float(np.std(mu)), 1e-6)
  mu = np.asarray(diffusion.pad_to_multiple(mu, config.latent.pad_multiple)[0]) * scale
  sigma = np.asarray(diffusion.pad_to_multiple(sigma, config.latent.pad_multiple)[0]) * scale
  if parallel.is_main_process():
    io.write_npz(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32),
                 hw=np.asarray(hw), scale=np.float64(scale), fingerprint=np.asarray(fp))
  return {"mu": mu.astype(np.float32), "sigma": sigma.astype(np.float32), "hw": tuple(hw),
          "scale": float(scale)}


# ----------------------------------------------------------------------------- model


def make_unet(config: ml_collections.ConfigDict, latent_channels: int):
  kw = common.tuples(config.model.get("overrides", {}))
  kw.setdefault("in_channels", latent_channels)
  kw.setdefault("out_channels", latent_channels)
  if config.cond.kind == "covariates":
    kw.update(with_conditioning=True, cross_attention_dim=len(input_pipeline.COVARIATES))
  elif config.cond.kind != "none":
    raise ValueError(f"cond.kind {config.cond.kind!r}: expected 'none' or 'covariates'")
  return UNETS[config.model.name](**kw)


def make_apply(model) -> Callable:
  """apply(params, x_t, t, context) -> predicted noise, as ldm_jax.diffusion expects."""
  def apply(params, x, t, context):
    return model.apply({"params": params}, x, t, context)
  return apply


def make_schedule(config) -> diffusion.Schedule:
  s = config.schedule
  return diffusion.make_schedule(s.num_steps, s.beta_start, s.beta_end, s.kind)


def learning_rate_fn(optim: ml_collections.ConfigDict, total_steps: int):
  """optim.schedule: "constant" (the reference) or "cosine" (decay to 0 over the run)."""
  kind = optim.get("schedule", "constant")
  if kind == "constant":
    return optim.learning_rate
  if kind == "cosine":
    return optax.cosine_decay_schedule(optim.learning_rate, max(int(total_steps), 1))
  raise ValueError(f"optim.schedule {kind!r}: expected 'constant' or 'cosine'")


def create_state(config, model, latent_shape, rng, total_steps: int = 1
                 ) -> train_state.TrainState:
  x = jnp.zeros((1, *latent_shape), jnp.float32)
  ctx = (jnp.zeros((1, 1, len(input_pipeline.COVARIATES)), jnp.float32)
         if config.cond.kind == "covariates" else None)
  params = jax.jit(model.init)(rng, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
  o = config.optim
  tx = optax.adamw(learning_rate_fn(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                   weight_decay=o.weight_decay)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def contexts(config, records: dict, workdir: str) -> Optional[np.ndarray]:
  """(N, 1, 6) normalised covariates of the records, or None without conditioning."""
  if config.cond.kind != "covariates":
    return None
  cov = input_pipeline.covariates(config, records, workdir)
  return input_pipeline.normalize_covariates(cov, config.cond.offset, config.cond.scale)


# ----------------------------------------------------------------------------- steps


def train_step(state: train_state.TrainState, batch: dict, rng: jax.Array, *,
               schedule: diffusion.Schedule, sample_latent: bool,
               learning_rate) -> tuple[train_state.TrainState, dict]:
  """One AdamW step on the noise-prediction MSE; batch: mu, sigma (B, H, W, C)[, context].

  learning_rate: the optimiser's (a number or an optax schedule), for the metrics only.
  """
  rng = jax.random.fold_in(rng, state.step)
  k_z, k_loss = jax.random.split(rng)
  z = batch["mu"]
  if sample_latent:
    z = z + batch["sigma"] * jax.random.normal(k_z, z.shape, z.dtype)
  apply = lambda p, x, t, c: state.apply_fn({"params": p}, x, t, c)
  loss, grads = jax.value_and_grad(diffusion.ddpm_loss, argnums=1)(
      apply, state.params, schedule, z, k_loss, batch.get("context"))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": jnp.asarray(learning_rate(state.step) if callable(learning_rate)
                                          else learning_rate, jnp.float32)}
  return state.apply_gradients(grads=grads), metrics


def sample_images(params: Any, x_T: jax.Array, context: Optional[jax.Array], *,
                  apply_fn: Callable, decode: Callable, schedule: diffusion.Schedule,
                  hw: tuple, scale: float, num_inference_steps: int, eta: float,
                  rng: jax.Array) -> jax.Array:
  """DDIM from x_T (B, H', W', c) to decoded images (B, H, W): jit this."""
  z = diffusion.ddim_sample(apply_fn, params, schedule, tuple(x_T.shape), rng,
                            num_inference_steps=num_inference_steps, eta=eta, context=context,
                            x_T=x_T)
  return decode(diffusion.crop_to(z, hw) / scale)[..., 0]


def make_train_step(config: ml_collections.ConfigDict, schedule: diffusion.Schedule,
                    total_steps: int = 1):
  """train_step jitted for a config, the state donated."""
  return jax.jit(functools.partial(train_step, schedule=schedule,
                                   sample_latent=bool(config.latent.sample),
                                   learning_rate=learning_rate_fn(config.optim, total_steps)),
                 donate_argnums=(0,))


def make_sample_fn(config: ml_collections.ConfigDict, run: dict):
  """sample_images jitted for a run (see prepare): fn(params, x_T, context, rng=...)."""
  lat = run["latents"]
  return jax.jit(functools.partial(
      sample_images, apply_fn=run["apply"], decode=run["stage"]["decode"],
      schedule=run["schedule"], hw=lat["hw"], scale=lat["scale"],
      num_inference_steps=config.sample.num_inference_steps, eta=config.sample.eta))


# ----------------------------------------------------------------------------- loop


def prepare(config, workdir: str, mesh) -> dict:
  """Records, first stage, cached latents, contexts, UNet and schedule of a run."""
  records = input_pipeline.load_records(config, workdir)
  stage = first_stage(config, mesh)
  lat = latents(config, workdir, records, stage, mesh)
  model = make_unet(config, stage["channels"])
  return {"records": records, "stage": stage, "latents": lat, "model": model,
          "apply": make_apply(model), "schedule": make_schedule(config),
          "context": contexts(config, records, workdir)}


def train(config: ml_collections.ConfigDict, workdir: str, mesh=None,
          stop_after: Optional[int] = None) -> dict:
  """Trains the diffusion UNet, resuming from `workdir` if it holds a run.

  Args:
    config: sections data, autoencoder, latent, model, cond, schedule, duplication, optim,
      train, sample (configs/ldm_*_diffusion.py).
    workdir: outputs (module docstring).
    mesh: device mesh (default: all devices).
    stop_after: stop as if killed after this many steps of this call (tests).

  Returns:
    dict(step, state, metrics (last logged row), counts (duplication)).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  tc = config.train
  common.check_batch(tc.batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)
  common.check_config_unchanged(workdir, config, ("model", "cond"))
  run = prepare(config, workdir, mesh)
  records, lat, ctx = run["records"], run["latents"], run["context"]
  n = len(records["keys"])
  dup = config.duplication
  counts = input_pipeline.duplication_counts(n, dup.mode, dict(dup.ranges), dup.seed)
  train_list = input_pipeline.expand(counts)
  total = common.num_steps(tc, len(train_list), tc.batch_size)
  spec = {"records": n, "train_list": int(len(train_list)), "seed": config.seed,
          "batch": tc.batch_size,
          "fingerprint": io.fingerprint(train_list, lat["mu"], *records["keys"])}
  logging.info("Diffusion: %d unique images, %d with duplication %r, %d steps", n,
               len(train_list), dup.mode, total)

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  latent_shape = lat["mu"].shape[1:]
  state = parallel.replicate(create_state(config, run["model"], latent_shape, init_rng, total),
                             mesh)
  mngr, state, start = common.start_or_resume(workdir, state, mesh, spec,
                                              tc.keep_checkpoints)
  # Only once accepted: a refused run leaves the config and the duplication table as they were.
  common.save_config(workdir, config)
  if parallel.is_main_process():
    input_pipeline.write_duplication_csv(os.path.join(workdir, "duplication.csv"),
                                         records["keys"], counts)
  log = MetricsLog(workdir, resume_step=start)

  step_fn = make_train_step(config, run["schedule"], total)
  sample_fn = make_sample_fn(config, run)
  n_dev = mesh.devices.size
  n_grid = -(-tc.num_grid_samples // n_dev) * n_dev
  grid_rec = np.arange(n_grid) % n
  grid_noise = np.asarray(jax.random.normal(jax.random.key(config.sample.seed),
                                            (n_grid, *latent_shape)))

  def save_grid(state, step):
    g = common.local_rows(n_grid)
    c = None if ctx is None else parallel.shard_batch(ctx[grid_rec][g], mesh)
    imgs = sample_fn(state.params, parallel.shard_batch(grid_noise[g], mesh), c,
                     rng=jax.random.key(config.sample.seed))
    imgs = common.to_host(imgs)[:tc.num_grid_samples]
    if parallel.is_main_process():
      common.image_grid(os.path.join(workdir, "samples", f"samples-{step:06d}.png"), imgs,
                        titles=[records["uids"][i] for i in grid_rec[:len(imgs)]]
                        if ctx is not None else None)

  local = common.local_rows(tc.batch_size)

  def one_step(state, step):
    rec = train_list[common.batch_indices(len(train_list), tc.batch_size, config.seed,
                                          step)[local]]
    batch = {"mu": lat["mu"][rec], "sigma": lat["sigma"][rec]}
    if ctx is not None:
      batch["context"] = ctx[rec]
    return step_fn(state, parallel.shard_batch(batch, mesh), step_rng)

  state, step, row = common.train_loop(
      state, one_step, start=start, total=total, train=tc, log=log, mngr=mngr, spec=spec,
      workdir=workdir, desc="diffusion", plot_keys=("loss",), on_sample=save_grid,
      stop_after=stop_after)
  log.close()
  return {"step": step, "state": state, "metrics": row, "counts": counts}


def load_unet(workdir: str, config, model, latent_shape, mesh):
  """The UNet parameters of a diffusion run's latest checkpoint."""
  target = jax.eval_shape(lambda: create_state(config, model, latent_shape, jax.random.key(0)))
  mngr = common.checkpoint_manager(workdir, keep=1, create=False)
  restored = common.restore_latest(mngr, target, mesh)
  mngr.close()
  if restored is None:
    raise io.InputError(f"{workdir}: no diffusion checkpoint; train it first (--mode=diffusion)")
  return restored[0].params, int(restored[1]["step"])
