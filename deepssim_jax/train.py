"""Training DeepSSIM: a Siamese ConvNeXt regressing pixel SSIM with embedding cosines.

Pure, jitted steps (`train_step`, `eval_step`) over a data-parallel Mesh (batch sharded on
"data", state replicated); AdamW with global-norm clipping, the stem and first stages
frozen through optax masking; orbax checkpoints of the latest state (with the input
position) and of the best state by validation loss, the config saved beside them; metrics
to a CSV and TensorBoard event files; a killed run resumes from its latest checkpoint and
ends exactly where an uninterrupted run would.

Longer than most modules because training is one idea whose parts (optimizer and freezing,
steps, checkpoints and resume, the loop) change together.
"""

import functools
import json
import os
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from flax.training import train_state
from tqdm import tqdm

from deepssim_jax import (augment, convert, convnext_keys, fileio, models, parallel, pipeline,
                          runs, validate)


class TrainState(train_state.TrainState):
  batch_stats: Any = None


# ----------------------------------------------------------------------------- setup


FREEZE_RULES = ("stages", "reference", "none")


def trainable_mask(params, num_frozen_stages: int = 0, freeze: str = "stages") -> Any:
  """True for trained leaves. freeze: "stages" (ours: the stem and the first
  `num_frozen_stages` stages), "reference" (the reference's rule: every parameter whose
  torchvision `features` name contains '0' or '1', about 59% of ConvNeXt-Base) or "none"."""
  if freeze == "stages":
    return models.freeze_mask(params, num_frozen_stages)
  if freeze == "reference":
    return convnext_keys.reference_freeze_mask(params)
  if freeze == "none":
    return jax.tree.map(lambda _: True, params)
  raise ValueError(f"unknown model.freeze {freeze!r}; choose one of {FREEZE_RULES}")


def lr_scales(params, layer_decay: float) -> Any:
  """Layer-wise learning-rate decay (DeepSSIM++): the head at the base rate, backbone stage
  i of n at decay ** (n - i), the stem with stage 0. 0 or 1: every leaf at 1."""
  flat = traverse_util.flatten_dict(dict(params))
  n = len({p[1] for p in flat if p[0] == "backbone" and p[1].startswith("stages_")})

  def scale(path):
    if not layer_decay or layer_decay == 1.0 or path[0] != "backbone":
      return 1.0
    i = 0 if path[1] == "stem" else int(path[1].split("_")[1])
    return float(layer_decay) ** (n - i)

  return traverse_util.unflatten_dict({p: scale(p) for p in flat})


def _schedule(optim: ml_collections.ConfigDict, total_steps: int, scale: float = 1.0):
  if optim.schedule == "constant":
    return optim.learning_rate * scale
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate * scale, optim.warmup_steps,
        max(total_steps, optim.warmup_steps + 1))
  raise ValueError(f"unknown schedule {optim.schedule!r} (constant, cosine)")


def make_optimizer(params, optim: ml_collections.ConfigDict, num_frozen_stages: int,
                   total_steps: int, freeze: str = "stages") -> optax.GradientTransformation:
  """AdamW + global-norm clipping on trainable leaves; frozen leaves get zero updates.

  With optim.layer_decay, each group of lr_scales gets its own AdamW at the scaled rate
  (torch's per-group AdamW: the decoupled weight decay scales with the group's rate).
  """
  def adamw(scale):
    return optax.adamw(_schedule(optim, total_steps, scale), b1=optim.b1, b2=optim.b2,
                       eps=optim.eps, weight_decay=optim.weight_decay)

  mask = trainable_mask(params, num_frozen_stages, freeze)
  decay = optim.get("layer_decay", 0.0)
  if not decay:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw(1.0))
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  scales = lr_scales(params, decay)
  labels = jax.tree.map(lambda t, sc: f"lr_x{sc:.6g}" if t else "frozen", mask, scales)
  txs = {lab: adamw(float(lab[4:])) for lab in set(jax.tree.leaves(labels)) if lab != "frozen"}
  txs["frozen"] = optax.set_to_zero()
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm),
                     optax.multi_transform(txs, labels))


def learning_rate(optim: ml_collections.ConfigDict, step: jax.Array, total_steps: int):
  """The base (head) learning rate at a step."""
  lr = _schedule(optim, total_steps)
  return lr(step) if callable(lr) else jnp.asarray(lr, jnp.float32)


def model_dtype(config: ml_collections.ConfigDict) -> str:
  """The compute dtype name of a config's model: config.model.dtype, or a model.overrides
  dtype (how configs set it before the field existed; configs without the field, such as
  older config.json files, compute in float32).

  Raises:
    validate.ConfigError: a dtype not in models.COMPUTE_DTYPES, or an overrides dtype that
      contradicts a non-default model.dtype.
  """
  m = config.model
  field, legacy = m.get("dtype", "float32"), m.get("overrides", {}).get("dtype")
  if legacy is not None and field not in ("float32", legacy):
    raise validate.ConfigError(
        f"config.model.dtype {field!r} and config.model.overrides.dtype {legacy!r} disagree",
        hint="set the compute dtype with config.model.dtype only")
  name = field if legacy is None else legacy
  if name not in models.COMPUTE_DTYPES:
    key = "model.dtype" if legacy is None else "model.overrides.dtype"
    raise validate.ConfigError(f"config.{key} must be one of {list(models.COMPUTE_DTYPES)}, "
                               f"got {name!r}", hint=validate.CONFIG_HINT)
  return name


def model_from_config(config: ml_collections.ConfigDict):
  """The DeepSSIM module a config names (JSON-restored lists become tuples), computing in
  config.model.dtype (model_dtype: a ConfigError names a bad one); with model.ensemble
  K > 1, a models.Ensemble of K of them (an exported ensemble's config)."""
  overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v
               for k, v in dict(config.model.get("overrides", {})).items() if k != "dtype"}
  make = lambda: models.make_model(config.model.name, head=config.model.get("head", "wacv"),
                                   dtype=model_dtype(config), **overrides)
  k = int(config.model.get("ensemble", 1))
  return make() if k == 1 else models.Ensemble(members=tuple(make() for _ in range(k)))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, image_shape,
                       total_steps: int) -> TrainState:
  model = model_from_config(config)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  tx = make_optimizer(variables["params"], config.optim, config.model.num_frozen_stages,
                      total_steps, config.model.get("freeze", "stages"))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def check_freezing(config: ml_collections.ConfigDict) -> None:
  """Refuses to freeze layers that were never loaded.

  A frozen random stem feeds a LayerNorm that divides out every grid-aligned 4x4 patch's
  scale: the network can no longer see local contrast, which SSIM is made of. Refused
  rather than unfrozen with a warning, because a run that silently trains something other
  than what its config says would be compared with the paper as if it were the paper's.
  """
  m = config.model
  freezes = (m.get("freeze", "stages") == "reference"
             or (m.get("freeze", "stages") == "stages" and m.num_frozen_stages > 0))
  if freezes and not m.get("init_from", ""):
    raise fileio.InputError(
        "model.num_frozen_stages / model.freeze freeze backbone layers, but model.init_from "
        "is empty: frozen random layers cannot learn (and a frozen random stem cannot see "
        "local contrast). Pass --config.model.init_from=<torchvision convnext .pth, timm "
        ".safetensors or a converted checkpoint folder> (see README: pretrained weights), or "
        "--config.model.num_frozen_stages=0 --config.model.freeze=stages to train all layers.")


def initial_backbone(config: ml_collections.ConfigDict, image_shape) -> Optional[dict]:
  """params['backbone'] from model.init_from (None when empty)."""
  path = config.model.get("init_from", "")
  if not path:
    return None
  model = model_from_config(config)
  if not os.path.isdir(path):
    return convert.backbone_params(path, model, image_shape)
  # A training (or converted) workdir: its best checkpoint, or the one a spec suffix names.
  m = re.fullmatch(r"(.*):(best|latest)(?::(\d+))?", path)
  run, which, step = (m.group(1), m.group(2), m.group(3)) if m else (path, "best", None)
  backbone = restore_model(run, which, int(step) if step else None)[1]["params"]["backbone"]
  target = convert.abstract_variables(model, image_shape)["params"]["backbone"]
  tree = convert.fill({"params": {"backbone": target}},
                      {("params", "backbone") + p: np.asarray(v)
                       for p, v in traverse_util.flatten_dict(dict(backbone)).items()},
                      path, ("params", "backbone"))
  return tree["params"]["backbone"]


def init_from_fingerprint(config) -> str:
  path = config.model.get("init_from", "")
  if not path:
    return ""
  return convert.file_sha256(path) if os.path.isfile(path) else os.path.abspath(path)


# ----------------------------------------------------------------------------- steps


def _cosines(state: TrainState, params, images_a, images_b, train: bool, rng=None,
             branches: str = "joint"):
  """Embeds both branches with shared weights and returns row-wise cosines.

  branches "joint": one pass over both batches (BatchNorm sees 2B images); "separate": one
  pass per branch as the reference runs its Siamese net (BatchNorm statistics per branch,
  the running averages updated twice, the second pass seeing the first's update).
  """
  variables = {"params": params, "batch_stats": state.batch_stats}
  if branches == "separate" and train:
    k_a, k_b = jax.random.split(rng)
    ea, upd = state.apply_fn(variables, images_a, train=True, mutable=["batch_stats"],
                             rngs={"dropout": k_a})
    eb, upd = state.apply_fn({"params": params, **upd}, images_b, train=True,
                             mutable=["batch_stats"], rngs={"dropout": k_b})
    return jnp.sum(ea * eb, axis=-1), upd
  if branches not in ("joint", "separate"):
    raise ValueError(f"unknown train.branches {branches!r} (joint, separate)")
  x = jnp.concatenate([images_a, images_b], axis=0)
  if train:
    emb, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": rng})
  else:
    emb, updates = state.apply_fn(variables, x, train=False), {}
  ea, eb = jnp.split(emb, 2, axis=0)
  return jnp.sum(ea * eb, axis=-1), updates


def band_weights(target: jax.Array, band: tuple[float, float], weight: float) -> jax.Array:
  """Per-pair loss weights: `weight` for targets in [band[0], band[1]], 1 elsewhere."""
  inside = (target >= band[0]) & (target <= band[1])
  return jnp.where(inside, jnp.float32(weight), jnp.float32(1.0))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *,
               aug: augment.AugmentConfig, optim: ml_collections.ConfigDict,
               total_steps: int, num_frozen_stages: int = 0,
               freeze: str = "stages", branches: str = "joint",
               band: tuple[float, float] = (0.0, 1.0),
               band_weight: float = 1.0,
               over_weight: float = 1.0) -> tuple[TrainState, dict]:
  """One AdamW step on MSE(cosine(embed(aug(a)), embed(aug(b))), ssim(a, b)).

  band_weight != 1 (ours): the squared error of a pair whose (final) target lies in
  [band[0], band[1]] weighs band_weight, the others 1, normalized by the weights' sum: the
  decision region between the paper's thresholds counts more than its share of pairs.
  over_weight != 1 (ours): the squared error of a pair whose cosine lies above its target
  weighs over_weight times more (an expectile loss, minimized at the 1 / (1 + over_weight)
  expectile of the targets a network cannot tell apart): where it is unsure, it errs low.

  With aug.p_contrast > 0, a share of the pairs first goes through a random intensity map
  shared by both images, with the target recomputed (augment.contrast_pairs); with
  aug.p_shape > 0 likewise through a random affine warp (augment.shape_pairs), and with
  aug.p_blur > 0 through a random Gaussian blur (augment.blur_pairs), and with
  aug.p_elastic > 0 through a smooth random displacement field (augment.elastic_pairs),
  and last, with aug.p_noise > 0, each image through its own Gaussian noise
  (augment.noise_pairs: acquisition noise comes after the anatomy and the contrast; with
  aug.noise_first before the contrast, which then shapes it). Before them, with
  aug.p_neighbour > 0, a share of the pairs is replaced by an image and a smoothly warped
  copy of it, target their SSIM (augment.neighbour_pairs). augment.randomize_pairs holds
  the order.

  Gradients of the frozen stages are replaced by zeros before anything reads them, so XLA
  drops their computation (and the backward pass below the first trainable layer) and
  the gradient all-reduce carries trainable parameters only; grad_norm is theirs.
  """
  rng = jax.random.fold_in(rng, state.step)
  k_a, k_b, k_drop = jax.random.split(rng, 3)
  a, b, target = augment.randomize_pairs(rng, batch["image_a"], batch["image_b"],
                                         batch["ssim"], aug)
  a = augment.augment_batch(k_a, a, aug)
  b = augment.augment_batch(k_b, b, aug)

  weight = None if band_weight == 1.0 else band_weights(target, band, band_weight)

  def loss_fn(params):
    cos, updates = _cosines(state, params, a, b, train=True, rng=k_drop, branches=branches)
    err = cos - target
    w = weight
    if over_weight != 1.0:  # a constant of the gradient: it only picks a side of the target
      over = jnp.where(jax.lax.stop_gradient(err) > 0, jnp.float32(over_weight), 1.0)
      w = over if w is None else w * over
    loss = jnp.mean(err ** 2) if w is None else jnp.sum(w * err ** 2) / jnp.sum(w)
    return loss, (updates, jnp.mean(jnp.abs(err)))

  (loss, (updates, mae)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if freeze == "reference" or (freeze == "stages" and num_frozen_stages):
    mask = trainable_mask(state.params, num_frozen_stages, freeze)
    grads = jax.tree.map(lambda g, trainable: g if trainable else jnp.zeros_like(g), grads,
                         mask)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "mae": mae, "grad_norm": optax.tree.norm(grads),
             "learning_rate": learning_rate(optim, state.step, total_steps)}
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, rng: Optional[jax.Array] = None,
              aug: Optional[augment.AugmentConfig] = None) -> dict:
  """Sums of squared and absolute errors over the real (weight 1) rows of a batch.

  With `aug` (train.augment_valid, the reference's validation), both images are augmented
  as in training, from `rng`.
  """
  a, b = batch["image_a"], batch["image_b"]
  if aug is not None:
    k_a, k_b = jax.random.split(rng)
    a, b = augment.augment_batch(k_a, a, aug), augment.augment_batch(k_b, b, aug)
  cos, _ = _cosines(state, state.params, a, b, train=False)
  err, w = cos - batch["ssim"], batch["weight"]
  return {"sse": jnp.sum(w * err ** 2), "sae": jnp.sum(w * jnp.abs(err)), "count": jnp.sum(w)}


def evaluate(state, eval_fn, ds, mesh, rng: Optional[jax.Array] = None) -> dict:
  """Validation MSE and MAE. With `rng`, batch i is augmented from fold_in(rng, i): the
  same draws at every evaluation, so validation losses of different steps compare."""
  sums = None
  for i, batch in enumerate(pipeline.iterate(ds)):
    args = () if rng is None else (jax.random.fold_in(rng, i),)
    out = eval_fn(state, parallel.shard_batch(batch, mesh), *args)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = max(float(sums["count"]), 1.0)
  return {"val_loss": float(sums["sse"]) / n, "val_mae": float(sums["sae"]) / n}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_managers(workdir: str, config) -> tuple[ocp.CheckpointManager,
                                                        ocp.CheckpointManager]:
  """The latest state (resuming) and the best model by validation loss (evaluation)."""
  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  # Multi-process: both managers save the same step from background threads, and orbax's
  # cross-process barrier names ('async_write_complete.<step>', ...) differ only by this
  # prefix: two threads waiting on one name fail ("Barrier ... is already ongoing").
  def options(name, **kw):
    return ocp.CheckpointManagerOptions(
        create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=name), **kw)

  latest = ocp.CheckpointManager(
      os.path.join(root, "latest"), item_names=("state", "data"),
      options=options("latest", max_to_keep=config.train.keep_latest))
  best = ocp.CheckpointManager(
      os.path.join(root, "best"), item_names=("state",),
      options=options("best", max_to_keep=1, best_fn=lambda m: m["val_loss"],
                      best_mode="min"))
  return latest, best


def inference_state(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats, "step": state.step}


def restore_model(workdir: str, which: str = "best", step: Optional[int] = None,
                  config=None, mesh=None):
  """Loads (model, variables, step) from a run's workdir: the best or the latest checkpoint,
  or a given step of either.

  The model is rebuilt from the config saved beside the checkpoint, so any run's
  checkpoint evaluates without knowing its config.
  """
  config = runs.load_config(workdir) if config is None else config
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = model_from_config(config)
  shape = tuple(config.data.image_size)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, *shape), jnp.float32))
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: 'best' or 'latest' (with an optional step)")
  root = os.path.abspath(os.path.join(workdir, "checkpoints", which))
  if not os.path.isdir(root):
    raise fileio.InputError(f"{root}: no checkpoints here (is {workdir} a training workdir?)")
  mngr = ocp.CheckpointManager(root, item_names=("state",) if which == "best" else
                               ("state", "data"))
  step = step if step is not None else mngr.latest_step()
  if step is None or step not in mngr.all_steps():
    raise fileio.InputError(f"{root}: no checkpoint at step {step}; have {mngr.all_steps()}")
  if which == "best":
    target = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  else:  # the full training state; keep its model part
    target = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), shape, 1))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(runs.abstract_like(target, mesh))))["state"]
  if which != "best":
    restored = {"params": restored.params, "batch_stats": restored.batch_stats}
  mngr.close()
  return model, {"params": restored["params"], "batch_stats": restored["batch_stats"]}, step


def checkpoint_steps(workdir: str) -> list[str]:
  """The checkpoint step folders of a training workdir (checkpoints/{latest,best}/<step>)."""
  out = []
  for which in ("latest", "best"):
    folder = os.path.join(workdir, "checkpoints", which)
    if os.path.isdir(folder):
      out += [os.path.join(folder, d) for d in os.listdir(folder) if d.isdigit()]
  return sorted(out)


def check_model_unchanged(workdir: str, config) -> None:
  """Refuses a run whose model settings differ from those of the checkpoints already in
  `workdir` (config.json's model section; init_from is compared by content in the resume
  spec; model.align, how the network is scored, may change), naming what changed, before
  anything is restored or written.

  Raises:
    InputError: the workdir has checkpoints and its config.json's model section differs.
  """
  path = os.path.join(workdir, "config.json")
  if not checkpoint_steps(workdir) or not os.path.isfile(path):
    return
  from deepssim_jax import config_lib  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    saved = json.load(f).get("model", {})
  # A field an older config.json lacks had its default then (the model's overrides aside).
  saved = {**json.loads(config_lib.base_config().model.to_json_best_effort()), **saved}
  now = json.loads(config.to_json_best_effort()).get("model", {})
  # model.align says how the network is scored (after registration or not), not what it is.
  for field in ("init_from", "align"):
    saved.pop(field, None), now.pop(field, None)
  saved, now = _dtype_in_field(saved), _dtype_in_field(now)
  diff = config_lib.config_changes(saved, now, "model.")
  if diff:
    raise fileio.InputError(f"{workdir}: its checkpoints are of another model ({'; '.join(diff)})"
                        f"; use a new workdir, or set these back to the values in {path}")


def _dtype_in_field(model: dict) -> dict:
  """A model section with a legacy overrides.dtype moved to its dtype field (the same
  compute dtype either way, so a run begun with one form resumes with the other)."""
  overrides = dict(model.get("overrides") or {})
  if "dtype" not in overrides:
    return model
  return {**model, "dtype": overrides.pop("dtype"), "overrides": overrides}


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, train_source,
                       valid_source, mesh=None, stop_after: Optional[int] = None) -> dict:
  """Trains to the configured number of epochs, resuming from `workdir` if it has a run.

  Args:
    config: the run's config (sections data, model, optim, train, aug).
    workdir: where checkpoints, config.json, metrics.csv and TensorBoard events go.
    train_source, valid_source: pipeline.PairSource of the train and valid pairs.
    mesh: device mesh (default: all devices).
    stop_after: stop (as if killed) after this many steps of this call: used to test
      resumption; the latest checkpoint is whatever the cadence had saved by then.

  Returns:
    A dict with the final step, last validation metrics and best validation loss.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if len(valid_source) == 0:
    raise fileio.InputError("no validation pairs (split 'valid' of the pair table): the best "
                        "checkpoint is chosen on them; raise pairs.valid_fraction")
  check_freezing(config)
  os.makedirs(workdir, exist_ok=True)
  check_model_unchanged(workdir, config)
  tc = config.train
  ds = pipeline.train_dataset(train_source, global_batch=tc.batch_size,
                              num_epochs=tc.num_epochs, seed=config.seed)
  total_steps = len(ds)
  steps_per_epoch = max(total_steps // tc.num_epochs, 1)
  eval_every = tc.eval_every_steps or steps_per_epoch
  ckpt_every = tc.checkpoint_every_steps or eval_every
  valid_ds = pipeline.eval_dataset(valid_source, global_batch=tc.eval_batch_size)
  data_spec = {"pairs": len(train_source), "seed": config.seed, "batch": tc.batch_size,
               "epochs": tc.num_epochs,
               "fingerprint": fileio.fingerprint(train_source.real_idx, train_source.synth_idx,
                                             train_source.ssim)}
  if config.model.get("init_from", ""):
    data_spec["init_from"] = init_from_fingerprint(config)

  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  image_shape = tuple(config.data.image_size)
  state = create_train_state(config, init_rng, image_shape, total_steps)
  latest, best = checkpoint_managers(workdir, config)
  if latest.latest_step() is None and config.model.get("init_from", ""):
    params = dict(state.params)
    params["backbone"] = initial_backbone(config, image_shape)
    state = state.replace(params=params)
    logging.info("Backbone initialised from %s", config.model.init_from)
  state = parallel.replicate(state, mesh)
  start = 0
  if latest.latest_step() is not None:
    step = latest.latest_step()
    restored = latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(runs.abstract_like(state, mesh)),
        data=ocp.args.JsonRestore()))
    if restored["data"]["spec"] != data_spec:
      old = restored["data"]["spec"]
      diff = [f"{k}: {old.get(k, '<unset>')!r} -> {data_spec.get(k, '<unset>')!r}"
              for k in sorted(set(old) | set(data_spec)) if old.get(k) != data_spec.get(k)]
      latest.close(), best.close()
      raise fileio.InputError(f"{workdir}: its checkpoint was trained on other data/settings "
                          f"({'; '.join(diff)}); use a new workdir")
    state, start = restored["state"], restored["data"]["batches_consumed"]
    logging.info("Resumed from %s at step %d", latest.directory, step)
  runs.save_config(workdir, config)  # only now: a refused run leaves the workdir as it was
  log = runs.MetricsLog(workdir, resume_step=start)

  aug = augment.AugmentConfig.from_config(config.aug)
  step_fn = jax.jit(functools.partial(train_step, aug=aug, optim=config.optim,
                                      total_steps=total_steps,
                                      num_frozen_stages=config.model.num_frozen_stages,
                                      freeze=config.model.get("freeze", "stages"),
                                      branches=tc.get("branches", "joint"),
                                      band=tuple(tc.get("band", (0.0, 1.0))),
                                      band_weight=tc.get("band_weight", 1.0),
                                      over_weight=tc.get("over_weight", 1.0)),
                    donate_argnums=(0,))
  valid_rng = None
  if tc.get("augment_valid", False):
    eval_fn = jax.jit(functools.partial(eval_step, aug=aug))
    valid_rng = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
  else:
    eval_fn = jax.jit(eval_step)
  evals = [r for r in log.rows if r.get("val_loss", "") != ""]  # from before a resume
  best_val = min([float(r["val_loss"]) for r in evals], default=float("inf"))
  last_eval = ({k: float(evals[-1][k]) for k in ("val_loss", "val_mae")} if evals else {})

  def save(step: int, val: Optional[dict]):
    latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"batches_consumed": step, "spec": data_spec})))
    if val is not None:
      best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(inference_state(state))), metrics=val)

  bar = tqdm(total=total_steps, initial=start, desc="train", unit="step",
             disable=not parallel.is_main_process())
  t0, n0, pending = time.perf_counter(), start, []
  step = start
  for batch in pipeline.iterate(ds, start=start, num_workers=tc.num_workers):
    state, metrics = step_fn(state, parallel.shard_batch(batch, mesh), step_rng)
    step += 1
    pending.append(metrics)
    bar.update(1)
    is_eval = step % eval_every == 0 or step == total_steps
    if step % tc.log_every_steps == 0 or is_eval:
      fetched = jax.device_get(pending)
      pending = []
      dt = time.perf_counter() - t0
      row = {k: np.mean([m[k] for m in fetched]) for k in fetched[0]}
      row["pairs_per_s"] = (step - n0) * tc.batch_size / max(dt, 1e-9)
      t0, n0 = time.perf_counter(), step
      if is_eval:
        last_eval = evaluate(state, eval_fn, valid_ds, mesh, valid_rng)
        row.update(last_eval)
        best_val = min(best_val, last_eval["val_loss"])
      log.write(step, row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", **({"val_mae": f"{last_eval['val_mae']:.4f}"}
                                                    if is_eval else {}))
    if step % ckpt_every == 0 or is_eval:
      save(step, last_eval if is_eval else None)
    if stop_after is not None and step - start >= stop_after:
      break
  bar.close()
  latest.wait_until_finished()
  best.wait_until_finished()
  latest.close(), best.close(), log.close()
  return {"step": step, **last_eval, "best_val_loss": best_val,
          "params": state.params, "batch_stats": state.batch_stats}
