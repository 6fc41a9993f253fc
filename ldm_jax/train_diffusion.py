"""Training the second stage: the diffusion UNet on latents of the frozen autoencoder.

The reference's recipe (brAIn-science/DeepSSIM's LDM): latents of the trained KL autoencoder
(3 x 34 x 28 for 136 x 112 slices) zero-padded to multiples of 4 (3 x 36 x 28) for the UNet
and cropped back before decoding; noise-prediction MSE under the scaled-linear 1000-step
schedule; AdamW lr 2.5e-5, batch 8; optional cross-attention conditioning on six covariates
(age, sex, sequence, CSF/WM/GM fractions; ldm_jax/input_pipeline.py) or on a caption
embedding per image (cond.kind "text": data.text_csv lists an .npz per record, array
"data"); duplication none / low / high (each unique image repeated k ~ U{1..4} or U{1..14}
times, the counts written to <workdir>/duplication.csv).

The first stage is chosen by name (FIRST_STAGES, a dict of builders returning encode /
decode functions): "kl" restores a trained autoencoder run (autoencoder.workdir, its
autoencoder.checkpoint "latest" or "best"); "identity" diffuses in pixel space (tests and
tiny demos). Every image is encoded once and cached (<workdir>/latents.npz: posterior mean
and standard deviation of the training and validation records, padded, multiplied by the
latent scale factor). The cache is keyed on what it depends on (`latent_key`: the first
stage's weights and step, the images, the scale factor, the padding, the intensity
scaling, mean or sample): a change rebuilds it in a workdir without checkpoints and is
refused, naming what changed, in one whose checkpoints were trained on the old latents.
Latent settings:
  latent.sample: False trains on the posterior mean (the reference:
    `autoencoder.encode(images)[0]`); True draws z = mu + sigma eps each step (MONAI's
    encode_stage_2_inputs);
  latent.scale_factor: a number (the reference: 1), or 0 for 1 / std of the cached
    training means (MONAI's tutorials);
  latent.pad_mode: "symmetric" (MONAI's DivisiblePad default, the reference: 34 -> one row
    above and one below) or "end".

With a validation split (data.valid_fraction > 0) the noise-prediction loss of the
validation records is computed every train.valid_every_steps (0: every epoch, as the
reference) on fixed noise and timesteps (so values are comparable across steps, unlike
the reference's fresh draws), logged as valid_loss, and the weights of the lowest kept in
<workdir>/best (generation can use them: generate.checkpoint = "best"). train.ema_decay > 0
keeps an exponential moving average of the UNet's weights, which then serves validation,
sample grids, the best checkpoint and generation. train.mixed_precision computes the UNet
in bfloat16 in training, validation, sample grids and generation's DDIM sampling (make_unet;
weights, optimiser, loss and the DDIM latents stay float32, the first stage decodes in
float32; the reference uses torch autocast). It may differ between training and
generation: generation's record names it.

Jitted `train_step` with the state donated, data-parallel over a Mesh, orbax checkpoints,
resumable (same batches as an uninterrupted run), metrics.csv + loss.png, and DDIM sample
grids (samples/samples-<step>.png, the first records' conditions, fixed noise).
It is longer than train_autoencoder.py because the data it trains on is built here too
(first stage, latent cache, conditioning contexts; `prepare`, which generate.py reuses).
"""

import functools
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from deepssim_jax import config_lib, fileio, parallel, runs
from ldm_jax import common, diffusion, input_pipeline, unet

UNETS = {"DiffusionModelUNet_ref": unet.DiffusionModelUNet_ref,
         "DiffusionModelUNet_tiny": unet.DiffusionModelUNet_tiny,
         "DiffusionModelUNet": unet.DiffusionModelUNet}
CONDITIONS = ("none", "covariates", "text")


class DiffusionState(train_state.TrainState):
  """The UNet's training state; ema_params is None unless train.ema_decay > 0."""
  ema_params: Any = None


# ----------------------------------------------------------------------------- first stage


def kl_stage(config: ml_collections.ConfigDict, mesh) -> dict:
  """The frozen KL autoencoder of config.autoencoder.workdir (its autoencoder.checkpoint)."""
  from ldm_jax import train_autoencoder  # pylint: disable=g-import-not-at-top
  which = config.autoencoder.get("checkpoint", "latest")
  model, params, ae_config, data = train_autoencoder.load_autoencoder(
      config.autoencoder.workdir, mesh, which)
  seen = lambda c: {"image_size": tuple(c.data.image_size),
                    "intensity": c.data.get("intensity", "zscore")}  # older runs: z-scored
  theirs, ours = seen(ae_config), seen(config)
  for field in ours:
    if theirs[field] != ours[field]:
      raise fileio.InputError(f"{config.autoencoder.workdir}: the autoencoder was trained with "
                          f"data.{field} = {theirs[field]!r}, this run has {ours[field]!r}")
  encode = lambda x: model.apply({"params": params}, x, method="encode")
  decode = lambda z: model.apply({"params": params}, z, method="decode")
  return {"encode": encode, "decode": decode, "channels": model.latent_channels,
          "fingerprint": f"kl:{which}:step{int(data['step'])}:"
                         f"{common.params_fingerprint(params)}"}


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


def latent_key(config: ml_collections.ConfigDict, stage: dict, records: dict,
               valid: Optional[dict]) -> dict:
  """What cached latents depend on (JSON-ready): a change of any of these rebuilds them."""
  lc = config.latent
  return {"first_stage": str(stage["fingerprint"]),
          "records": fileio.fingerprint(records["images"], *records["keys"]),
          "valid": None if valid is None else fileio.fingerprint(valid["images"], *valid["keys"]),
          "intensity": config.data.get("intensity", "zscore"),
          "scale_factor": float(lc.scale_factor), "pad_multiple": int(lc.pad_multiple),
          "pad_mode": lc.get("pad_mode", "end"), "sample": bool(lc.sample)}


def latents(config: ml_collections.ConfigDict, workdir: str, records: dict, stage: dict,
            mesh, valid: Optional[dict] = None) -> dict:
  """The cached latents: dict(mu, sigma (N, H', W', c) padded and scaled, hw (unpadded
  latent size), scale, key[, valid_mu, valid_sigma]). Encoded into <workdir>/latents.npz,
  re-encoded when latent_key changes."""
  path = os.path.join(workdir, "latents.npz")
  key = latent_key(config, stage, records, valid)
  parts = ("mu", "sigma") + (() if valid is None else ("valid_mu", "valid_sigma"))
  if os.path.exists(path):
    with np.load(path) as z:
      cache = {k: z[k] for k in z.files}
    old = json.loads(str(cache["key"])) if "key" in cache else {}
    if old == key:
      return {**{k: cache[k] for k in parts}, "hw": tuple(int(v) for v in cache["hw"]),
              "scale": float(cache["scale"]), "key": key}
    changes = "; ".join(config_lib.config_changes(old, key, "") if old else
                        ["no key (an older cache)"])
    if common.has_checkpoints(workdir):
      raise fileio.InputError(f"{path}: the latents this run was trained on are out of date "
                          f"({changes}); use a new workdir (or restore the autoencoder and "
                          "settings it was trained with)")
    logging.warning("%s: cached latents are out of date (%s); encoding again", path, changes)
  logging.info("Encoding %d training and %d validation images", len(records["images"]),
               0 if valid is None else len(valid["images"]))
  lc = config.latent
  pad = functools.partial(diffusion.pad_to_multiple, multiple=lc.pad_multiple,
                          mode=lc.get("pad_mode", "end"))
  mu, sigma = encode_all(stage, records["images"], config.train.encode_batch_size, mesh)
  hw = mu.shape[1:3]
  scale = lc.scale_factor or 1.0 / max(float(np.std(mu)), 1e-6)
  out = {"mu": mu, "sigma": sigma}
  if valid is not None:
    out["valid_mu"], out["valid_sigma"] = encode_all(stage, valid["images"],
                                                     config.train.encode_batch_size, mesh)
  out = {k: (np.asarray(pad(v)[0]) * scale).astype(np.float32) for k, v in out.items()}
  if parallel.is_main_process():
    fileio.write_npz(path, **out, hw=np.asarray(hw), scale=np.float64(scale),
                 key=np.asarray(json.dumps(key, sort_keys=True)))
  return {**out, "hw": tuple(int(v) for v in hw), "scale": float(scale), "key": key}


# ----------------------------------------------------------------------------- model


def make_unet(config: ml_collections.ConfigDict, latent_channels: int,
              cross_attention_dim: Optional[int] = None):
  """The UNet of a config; conditioned (cross-attention of that width) when
  cross_attention_dim is given (6 covariates, or the caption embedding's length)."""
  kw = common.tuples(config.model.get("overrides", {}))
  kw.setdefault("in_channels", latent_channels)
  kw.setdefault("out_channels", latent_channels)
  if config.cond.kind not in CONDITIONS:
    raise ValueError(f"cond.kind {config.cond.kind!r}: expected one of {CONDITIONS}")
  if config.cond.kind == "covariates":
    cross_attention_dim = cross_attention_dim or len(input_pipeline.COVARIATES)
  if config.cond.kind != "none":
    if not cross_attention_dim:
      raise ValueError(f"cond.kind {config.cond.kind!r} needs the context width")
    kw.update(with_conditioning=True, cross_attention_dim=int(cross_attention_dim))
  if config.train.get("mixed_precision", False):
    kw["dtype"] = jnp.bfloat16
  return UNETS[config.model.name](**kw)


def make_apply(model) -> Callable:
  """apply(params, x_t, t, context) -> predicted noise (float32), as ldm_jax.diffusion
  expects."""
  def apply(params, x, t, context):
    return model.apply({"params": params}, x, t, context).astype(jnp.float32)
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


def uses_ema(config: ml_collections.ConfigDict) -> bool:
  decay = float(config.train.get("ema_decay", 0.0))
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"train.ema_decay {decay}: expected 0 (off) <= decay < 1")
  return decay > 0


def weights_of(config: ml_collections.ConfigDict) -> Callable[[DiffusionState], Any]:
  """state -> the UNet weights a run is used with: the EMA when train.ema_decay > 0."""
  return (lambda s: s.ema_params) if uses_ema(config) else (lambda s: s.params)


def create_state(config, model, latent_shape, rng, total_steps: int = 1,
                 cross_attention_dim: Optional[int] = None) -> DiffusionState:
  x = jnp.zeros((1, *latent_shape), jnp.float32)
  ctx = (None if config.cond.kind == "none" else
         jnp.zeros((1, 1, cross_attention_dim or len(input_pipeline.COVARIATES)), jnp.float32))
  params = jax.jit(model.init)(rng, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
  o = config.optim
  tx = optax.adamw(learning_rate_fn(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                   weight_decay=o.weight_decay)
  ema = jax.tree.map(jnp.copy, params) if uses_ema(config) else None
  return DiffusionState.create(apply_fn=model.apply, params=params, tx=tx, ema_params=ema)


def contexts(config, records: dict, workdir: str) -> Optional[np.ndarray]:
  """(N, 1, D) contexts of the records: normalised covariates (D = 6) or caption
  embeddings (cond.kind "text", data.text_csv), or None without conditioning."""
  kind = config.cond.kind
  if kind not in CONDITIONS:
    raise ValueError(f"cond.kind {kind!r}: expected one of {CONDITIONS}")
  if kind == "none":
    return None
  if kind == "text":
    path = config.data.get("text_csv", "")
    if not path:
      raise fileio.InputError("conditioning 'text' needs config.data.text_csv: a CSV with columns "
                          "key,caption_emb_path (an .npz per training slice whose array "
                          "'data' is its caption embedding)")
    return input_pipeline.read_text_embeddings(path, records["keys"])
  cov = input_pipeline.covariates(config, records, workdir)
  return input_pipeline.normalize_covariates(cov, config.cond.offset, config.cond.scale)


# ----------------------------------------------------------------------------- steps


def train_step(state: DiffusionState, batch: dict, rng: jax.Array, *,
               schedule: diffusion.Schedule, sample_latent: bool,
               learning_rate, ema_decay: float = 0.0) -> tuple[DiffusionState, dict]:
  """One AdamW step on the noise-prediction MSE; batch: mu, sigma (B, H, W, C)[, context].

  learning_rate: the optimiser's (a number or an optax schedule), for the metrics only.
  ema_decay: > 0 updates state.ema_params = decay ema + (1 - decay) params after the step.
  """
  rng = jax.random.fold_in(rng, state.step)
  k_z, k_loss = jax.random.split(rng)
  z = batch["mu"]
  if sample_latent:
    z = z + batch["sigma"] * jax.random.normal(k_z, z.shape, z.dtype)
  apply = lambda p, x, t, c: state.apply_fn({"params": p}, x, t, c).astype(jnp.float32)
  loss, grads = jax.value_and_grad(diffusion.ddpm_loss, argnums=1)(
      apply, state.params, schedule, z, k_loss, batch.get("context"))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": jnp.asarray(learning_rate(state.step) if callable(learning_rate)
                                          else learning_rate, jnp.float32)}
  new = state.apply_gradients(grads=grads)
  if ema_decay > 0:
    new = new.replace(ema_params=optax.incremental_update(new.params, state.ema_params,
                                                          1.0 - ema_decay))
  return new, metrics


def valid_losses(params: Any, batch: dict, *, apply_fn: Callable,
                 schedule: diffusion.Schedule) -> jax.Array:
  """Per-record noise-prediction MSE on given noise and timesteps: batch mu, noise, t[,
  context] -> (B,)."""
  x_t = diffusion.q_sample(schedule, batch["mu"], batch["t"], batch["noise"])
  pred = apply_fn(params, x_t, batch["t"], batch.get("context"))
  return jnp.mean(jnp.square(pred - batch["noise"]), axis=tuple(range(1, pred.ndim)))


def sample_images(params: Any, x_T: jax.Array, context: Optional[jax.Array], *,
                  apply_fn: Callable, decode: Callable, schedule: diffusion.Schedule,
                  hw: tuple, scale: float, pad_mode: str, num_inference_steps: int,
                  eta: float, rng: jax.Array) -> jax.Array:
  """DDIM from x_T (B, H', W', c) to decoded images (B, H, W): jit this."""
  z = diffusion.ddim_sample(apply_fn, params, schedule, tuple(x_T.shape), rng,
                            num_inference_steps=num_inference_steps, eta=eta, context=context,
                            x_T=x_T)
  return decode(diffusion.crop_to(z, hw, pad_mode) / scale)[..., 0]


def make_train_step(config: ml_collections.ConfigDict, schedule: diffusion.Schedule,
                    total_steps: int = 1):
  """train_step jitted for a config, the state donated."""
  return jax.jit(functools.partial(train_step, schedule=schedule,
                                   sample_latent=bool(config.latent.sample),
                                   learning_rate=learning_rate_fn(config.optim, total_steps),
                                   ema_decay=float(config.train.get("ema_decay", 0.0))),
                 donate_argnums=(0,))


def make_sample_fn(config: ml_collections.ConfigDict, run: dict):
  """sample_images jitted for a run (see prepare): fn(params, x_T, context, rng=...)."""
  lat = run["latents"]
  return jax.jit(functools.partial(
      sample_images, apply_fn=run["apply"], decode=run["stage"]["decode"],
      schedule=run["schedule"], hw=lat["hw"], scale=lat["scale"],
      pad_mode=config.latent.get("pad_mode", "end"),
      num_inference_steps=config.sample.num_inference_steps, eta=config.sample.eta))


# ----------------------------------------------------------------------------- loop


def prepare(config, workdir: str, mesh) -> dict:
  """Records (training and, with a split, validation), first stage, cached latents,
  contexts, UNet and schedule of a run."""
  records = input_pipeline.load_records(config, workdir)
  valid = (input_pipeline.load_records(config, workdir, "valid")
           if input_pipeline.has_valid(config) else None)
  stage = first_stage(config, mesh)
  lat = latents(config, workdir, records, stage, mesh, valid)
  ctx = contexts(config, records, workdir)
  dim = None if ctx is None else int(ctx.shape[-1])  # the cross-attention width
  model = make_unet(config, stage["channels"], dim)
  return {"records": records, "valid": valid, "stage": stage, "latents": lat, "model": model,
          "apply": make_apply(model), "schedule": make_schedule(config), "context": ctx,
          "valid_context": None if valid is None else contexts(config, valid, workdir),
          "context_dim": dim}


def check_ema_unchanged(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to switch EMA on or off in a workdir with checkpoints (their state differs)."""
  if not common.has_checkpoints(workdir):
    return
  old = float(runs.load_config(workdir).get("train", {}).get("ema_decay", 0.0)) > 0
  if old != uses_ema(config):
    raise fileio.InputError(f"{workdir}: its checkpoints were trained "
                        f"{'with' if old else 'without'} EMA weights (train.ema_decay); use a "
                        "new workdir, or set it back")


def make_valid_fn(config: ml_collections.ConfigDict, run: dict, mesh) -> Callable:
  """state -> the mean noise-prediction loss of the validation records, on noise and
  timesteps fixed per record (seeded), with the weights the run is used with."""
  lat, ctx = run["latents"], run["valid_context"]
  mu = lat["valid_mu"]
  n = len(mu)
  key = jax.random.fold_in(jax.random.key(config.seed), 7_000_003)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), mu.shape, jnp.float32))
  t = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0,
                                    run["schedule"].num_steps))
  fn = jax.jit(functools.partial(valid_losses, apply_fn=run["apply"],
                                 schedule=run["schedule"]))
  get = weights_of(config)

  def batch(rows):
    out = {"mu": mu[rows], "noise": noise[rows], "t": t[rows]}
    if ctx is not None:
      out["context"] = ctx[rows]
    return out

  def valid_fn(state) -> float:
    return common.batched_mean(functools.partial(fn, get(state)), batch, n,
                               config.train.batch_size, mesh)

  return valid_fn


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
  check_ema_unchanged(workdir, config)
  run = prepare(config, workdir, mesh)
  records, lat, ctx = run["records"], run["latents"], run["context"]
  n = len(records["keys"])
  dup = config.duplication
  counts = input_pipeline.duplication_counts(n, dup.mode, dict(dup.ranges), dup.seed)
  train_list = input_pipeline.expand(counts)
  total = common.num_steps(tc, len(train_list), tc.batch_size)
  spec = {"records": n, "train_list": int(len(train_list)), "seed": config.seed,
          "batch": tc.batch_size,
          "fingerprint": fileio.fingerprint(train_list, lat["mu"], *records["keys"])}
  logging.info("Diffusion: %d unique images, %d with duplication %r, %d steps", n,
               len(train_list), dup.mode, total)

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  latent_shape = lat["mu"].shape[1:]
  state = parallel.replicate(create_state(config, run["model"], latent_shape, init_rng, total,
                                          run["context_dim"]), mesh)
  mngr, state, start = common.start_or_resume(workdir, state, mesh, spec,
                                              tc.keep_checkpoints)
  # Only once accepted: a refused run leaves the config and the duplication table as they were.
  runs.save_config(workdir, config)
  if parallel.is_main_process():
    input_pipeline.write_duplication_csv(os.path.join(workdir, "duplication.csv"),
                                         records["keys"], counts)
  log = runs.MetricsLog(workdir, resume_step=start)

  step_fn = make_train_step(config, run["schedule"], total)
  sample_fn = make_sample_fn(config, run)
  get = weights_of(config)
  n_dev = mesh.devices.size
  n_grid = -(-tc.num_grid_samples // n_dev) * n_dev
  grid_rec = np.arange(n_grid) % n
  grid_noise = np.asarray(jax.random.normal(jax.random.key(config.sample.seed),
                                            (n_grid, *latent_shape)))

  def save_grid(state, step):
    g = common.local_rows(n_grid)
    c = None if ctx is None else parallel.shard_batch(ctx[grid_rec][g], mesh)
    imgs = sample_fn(get(state), parallel.shard_batch(grid_noise[g], mesh), c,
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

  valid = None
  if run["valid"] is not None:
    valid = {"fn": make_valid_fn(config, run, mesh), "weights": get,
             "every": common.valid_every(tc, len(train_list), tc.batch_size),
             "mngr": common.best_manager(workdir)}
  state, step, row = common.train_loop(
      state, one_step, start=start, total=total, train=tc, log=log, mngr=mngr, spec=spec,
      workdir=workdir, desc="diffusion", plot_keys=("loss",), on_sample=save_grid,
      stop_after=stop_after, valid=valid)
  log.close()
  return {"step": step, "state": state, "metrics": row, "counts": counts}


def load_unet(workdir: str, config, run: dict, mesh, which: str = "latest"
              ) -> tuple[Any, int]:
  """(weights, step) of a diffusion run: the latest checkpoint's (the EMA when the run
  keeps one) or the best validation loss's."""
  target = jax.eval_shape(lambda: create_state(config, run["model"],
                                               run["latents"]["mu"].shape[1:],
                                               jax.random.key(0),
                                               cross_attention_dim=run["context_dim"]))
  weights, data = common.restore_weights(workdir, which, target, weights_of(config), mesh,
                                         "diffusion")
  return weights, int(data["step"])
