"""Training the first stage: the KL autoencoder with a patch-GAN (MONAI's recipe).

Generator loss (the reference's, brAIn-science/DeepSSIM's LDM):
  l1 |x - x_rec| + perceptual_weight P(x_rec, x) + kl_weight KL(q(z|x) || N(0, I))
  + adv_weight (D(x_rec) - 1)^2,
discriminator loss adv_weight (D(x_rec)^2 + (D(x) - 1)^2) / 2 (least squares, last output
of the PatchDiscriminator). KL is MONAI's: 0.5 sum(mu^2 + sigma^2 - log sigma^2 - 1) over
latent elements, averaged over the batch. P is pluggable (ldm_jax/perceptual.py): the
reference's LPIPS-squeeze ("lpips_squeeze", with SqueezeNet's ImageNet weights the user
brings, converted by `python -m ldm_jax.perceptual`), else a structural SSIM term. The
adversarial terms are off for the first loss.adv_warmup_steps steps (the reference: none; MONAI's
tutorials use a few epochs).

Both networks use Adam; gradients are accumulated (optax.MultiSteps) from
train.batch_size images per step to train.effective_batch_size per update (the reference:
8 per step, 16 per update). One pure `train_step` updates both networks, jitted with the
state donated, data-parallel over a Mesh (batch sharded on "data", state replicated; the
discriminator's BatchNorm statistics are over the global batch). The state (both networks,
both optimisers, the accumulators) is one pytree checkpointed by orbax; a killed run resumes
from its last checkpoint and sees the same batches it would have seen.

With a validation split (data.valid_fraction > 0: whole subjects held out) the
validation loss, l1 L1 + perceptual_weight P + kl_weight KL of the deterministic
reconstruction decode(z_mu) (no adversarial term: it measures the discriminator as much
as the autoencoder), is computed every train.valid_every_steps (0: every epoch) and the
autoencoder weights of the lowest are kept in <workdir>/best; diffusion runs encode with
them when autoencoder.checkpoint = "best". (The reference's script builds a validation
loader but never uses it, and keeps every epoch's weights.) train.mixed_precision computes
both networks in bfloat16 (weights, optimisers and losses stay float32; the reference uses
torch autocast).

Outputs in the workdir: config.json, checkpoints/, best/ (with a validation split),
training.npz (the image cache), metrics.csv (+ TensorBoard events), loss.png and
samples/recon-<step>.png (originals above their reconstructions).
"""

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from deepssim_jax import fileio, parallel, runs
from ldm_jax import autoencoder, common, discriminator, input_pipeline, perceptual

AUTOENCODERS = {"AutoencoderKL_ref": autoencoder.AutoencoderKL_ref,
                "AutoencoderKL_tiny": autoencoder.AutoencoderKL_tiny,
                "AutoencoderKL": autoencoder.AutoencoderKL}
DISCRIMINATORS = {"PatchDiscriminator_ref": discriminator.PatchDiscriminator_ref,
                  "PatchDiscriminator_tiny": discriminator.PatchDiscriminator_tiny,
                  "PatchDiscriminator": discriminator.PatchDiscriminator}


class DiscState(train_state.TrainState):
  batch_stats: Any = None


def _dtype(mixed_precision: bool) -> dict:
  return {"dtype": jnp.bfloat16} if mixed_precision else {}


def make_autoencoder(model: ml_collections.ConfigDict, mixed_precision: bool = False):
  return AUTOENCODERS[model.name](**common.tuples(model.get("overrides", {})),
                                  **_dtype(mixed_precision))


def make_discriminator(disc: ml_collections.ConfigDict, mixed_precision: bool = False):
  return DISCRIMINATORS[disc.name](**common.tuples(disc.get("overrides", {})),
                                   **_dtype(mixed_precision))


def accumulation_steps(train: ml_collections.ConfigDict) -> int:
  k, r = divmod(train.effective_batch_size, train.batch_size)
  if r or k < 1:
    raise ValueError(f"train.effective_batch_size {train.effective_batch_size} must be a "
                     f"multiple of train.batch_size {train.batch_size}")
  return k


def make_optimizer(lr: float, optim: ml_collections.ConfigDict, every_k: int):
  adam = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  return optax.MultiSteps(adam, every_k_schedule=every_k) if every_k > 1 else adam


def create_state(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """{"g": TrainState of the autoencoder, "d": DiscState of the discriminator}."""
  mp = bool(config.train.get("mixed_precision", False))
  ae, disc = make_autoencoder(config.model, mp), make_discriminator(config.disc, mp)
  x = jnp.zeros((1, *config.data.image_size, 1), jnp.float32)
  k_ae, k_d = jax.random.split(rng)
  g_params = jax.jit(ae.init)(k_ae, x)["params"]
  d_vars = jax.jit(functools.partial(disc.init, train=False))(k_d, x)
  k = accumulation_steps(config.train)
  g = train_state.TrainState.create(
      apply_fn=ae.apply, params=g_params,
      tx=make_optimizer(config.optim.learning_rate, config.optim, k))
  d = DiscState.create(apply_fn=disc.apply, params=d_vars["params"],
                       batch_stats=d_vars["batch_stats"],
                       tx=make_optimizer(config.optim.d_learning_rate, config.optim, k))
  return {"g": g, "d": d}


# ----------------------------------------------------------------------------- step


def kl_loss(z_mu: jax.Array, z_sigma: jax.Array) -> jax.Array:
  """MONAI's KL to N(0, I): per-sample sum over latent elements, mean over the batch."""
  var = jnp.square(z_sigma)
  kl = 0.5 * jnp.sum(jnp.square(z_mu) + var - jnp.log(var) - 1.0,
                     axis=tuple(range(1, z_mu.ndim)))
  return jnp.mean(kl)


def recon_terms(recon: jax.Array, z_mu: jax.Array, z_sigma: jax.Array, x: jax.Array,
                perceptual_fn) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(L1, perceptual, KL) of a reconstruction of x."""
  return jnp.mean(jnp.abs(recon - x)), perceptual_fn(recon, x), kl_loss(z_mu, z_sigma)


def valid_losses(params: Any, images: jax.Array, *, apply_fn, loss: ml_collections.ConfigDict,
                 perceptual_fn) -> jax.Array:
  """Per-image validation loss (module docstring) of (B, H, W, 1) images -> (B,)."""
  def one(x):
    recon, z_mu, z_sigma = (a.astype(jnp.float32) for a in apply_fn({"params": params},
                                                                     x[None]))
    l1, p, kl = recon_terms(recon, z_mu, z_sigma, x[None], perceptual_fn)
    return loss.l1_weight * l1 + loss.perceptual_weight * p + loss.kl_weight * kl
  return jax.vmap(one)(images)


def train_step(state: dict, batch: dict, rng: jax.Array, *, loss: ml_collections.ConfigDict,
               perceptual_fn, learning_rate: float) -> tuple[dict, dict]:
  """One generator and one discriminator (micro-)step on a batch {"image": (B, H, W, 1)}."""
  g, d = state["g"], state["d"]
  rng = jax.random.fold_in(rng, g.step)
  x = batch["image"]
  adv_w = jnp.where(g.step >= loss.adv_warmup_steps, loss.adv_weight, 0.0)

  def disc_logits(params, stats, images):
    outs, upd = d.apply_fn({"params": params, "batch_stats": stats}, images, train=True,
                           mutable=["batch_stats"])
    return outs[-1].astype(jnp.float32), upd["batch_stats"]

  def g_loss_fn(params):
    recon, z_mu, z_sigma = (a.astype(jnp.float32) for a in g.apply_fn({"params": params}, x,
                                                                       rng))
    l1, p, kl = recon_terms(recon, z_mu, z_sigma, x, perceptual_fn)
    logits, stats = disc_logits(d.params, d.batch_stats, recon)
    adv = jnp.mean(jnp.square(logits - 1.0))
    total = (loss.l1_weight * l1 + loss.perceptual_weight * p + loss.kl_weight * kl
             + adv_w * adv)
    return total, (recon, stats, {"l1": l1, "perceptual": p, "kl": kl, "adv_g": adv})

  (g_total, (recon, stats, parts)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      g.params)
  recon = jax.lax.stop_gradient(recon)

  def d_loss_fn(params):
    fake, s = disc_logits(params, stats, recon)
    real, s = disc_logits(params, s, x)
    d_loss = 0.5 * (jnp.mean(jnp.square(fake)) + jnp.mean(jnp.square(real - 1.0)))
    return adv_w * d_loss, (s, d_loss)

  (_, (stats, d_loss)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d.params)
  new = {"g": g.apply_gradients(grads=g_grads),
         "d": d.apply_gradients(grads=d_grads, batch_stats=stats)}
  metrics = {"loss_g": g_total, "loss_d": d_loss, **parts,
             "grad_norm_g": optax.tree.norm(g_grads), "grad_norm_d": optax.tree.norm(d_grads),
             "adv_weight": adv_w, "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
  return new, metrics


def reconstruct(state: dict, images: jax.Array) -> jax.Array:
  """Deterministic reconstructions (decode(z_mu)) of (B, H, W, 1) images."""
  ae = state["g"]
  return ae.apply_fn({"params": ae.params}, images, method="reconstruct")


def make_train_step(config: ml_collections.ConfigDict):
  """train_step jitted for a config, the state donated."""
  pfn = perceptual.make(config.loss.perceptual, **dict(config.loss.get("perceptual_kwargs", {})))
  return jax.jit(functools.partial(train_step, loss=config.loss, perceptual_fn=pfn,
                                   learning_rate=config.optim.learning_rate),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------- restore


def load_autoencoder(workdir: str, mesh=None, which: str = "latest"):
  """(model, params, config, data) of a trained autoencoder run: its latest checkpoint or
  (which="best") the weights of its best validation loss; data holds the step. The model
  computes in float32 whatever the run trained with."""
  config = runs.load_config(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  target = jax.eval_shape(lambda: create_state(config, jax.random.key(0)))
  params, data = common.restore_weights(workdir, which, target, lambda s: s["g"].params, mesh,
                                        "autoencoder")
  return make_autoencoder(config.model), params, config, data


# ----------------------------------------------------------------------------- loop


def make_valid_fn(config: ml_collections.ConfigDict, images: np.ndarray, mesh):
  """state -> the mean validation loss (valid_losses) of `images` (N, H, W)."""
  pfn = perceptual.make(config.loss.perceptual, **dict(config.loss.get("perceptual_kwargs", {})))

  @jax.jit
  def fn(state, x):
    g = state["g"]
    return valid_losses(g.params, x, apply_fn=g.apply_fn, loss=config.loss, perceptual_fn=pfn)

  def valid_fn(state) -> float:
    return common.batched_mean(functools.partial(fn, state),
                               lambda rows: images[rows, ..., None], len(images),
                               config.train.batch_size, mesh)

  return valid_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None,
                       stop_after: Optional[int] = None) -> dict:
  """Trains the autoencoder + discriminator, resuming from `workdir` if it holds a run.

  Args:
    config: sections data, model, disc, loss, optim, train (configs/ldm_*_autoencoder.py).
    workdir: outputs (module docstring).
    mesh: device mesh (default: all devices).
    stop_after: stop as if killed after this many steps of this call (tests).

  Returns:
    dict(step, state, metrics (the last logged row)).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  tc = config.train
  common.check_batch(tc.batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)
  common.check_config_unchanged(workdir, config, ("model", "disc"))
  records = input_pipeline.load_records(config, workdir)
  images = records["images"]
  valid_images = (input_pipeline.load_records(config, workdir, "valid")["images"]
                  if input_pipeline.has_valid(config) else None)
  total = common.num_steps(tc, len(images), tc.batch_size)
  spec = {"images": len(images), "seed": config.seed, "batch": tc.batch_size,
          "fingerprint": fileio.fingerprint(images, *records["keys"])}

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = parallel.replicate(create_state(config, init_rng), mesh)
  mngr, state, start = common.start_or_resume(workdir, state, mesh, spec,
                                              tc.keep_checkpoints)
  runs.save_config(workdir, config)  # only once accepted: a refused run leaves it as it was
  log = runs.MetricsLog(workdir, resume_step=start)

  step_fn = make_train_step(config)
  recon_fn = jax.jit(reconstruct)
  n_grid = min(tc.num_grid_images, len(images))
  grid_idx = np.linspace(0, len(images) - 1, n_grid).round().astype(int)
  grid_in = images[grid_idx][..., None]
  local = common.local_rows(tc.batch_size)

  def save_grid(state, step):
    n = -(-n_grid // mesh.devices.size) * mesh.devices.size
    x = parallel.shard_batch(parallel.pad_to(grid_in, n)[common.local_rows(n)], mesh)
    rec = common.to_host(recon_fn(state, x))[:n_grid, ..., 0]
    if parallel.is_main_process():
      common.image_grid(os.path.join(workdir, "samples", f"recon-{step:06d}.png"),
                        np.concatenate([grid_in[..., 0], rec]), ncols=n_grid)

  def one_step(state, step):
    idx = common.batch_indices(len(images), tc.batch_size, config.seed, step)[local]
    return step_fn(state, parallel.shard_batch({"image": images[idx][..., None]}, mesh),
                   step_rng)

  valid = None
  if valid_images is not None:
    valid = {"fn": make_valid_fn(config, valid_images, mesh), "weights": lambda s: s["g"].params,
             "every": common.valid_every(tc, len(images), tc.batch_size),
             "mngr": common.best_manager(workdir)}
  state, step, row = common.train_loop(
      state, one_step, start=start, total=total, train=tc, log=log, mngr=mngr, spec=spec,
      workdir=workdir, desc="autoencoder", on_sample=save_grid, stop_after=stop_after,
      plot_keys=("l1", "loss_g", "perceptual", "adv_g", "loss_d"), valid=valid)
  log.close()
  logging.info("Autoencoder: step %d of %d in %s", step, total, workdir)
  return {"step": step, "state": state, "metrics": row}
