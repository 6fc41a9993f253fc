"""What both LDM trainers and the generation job share: data order, checkpoints, plots.

* Data order is a pure function of (number of items, global batch, seed, step): an endless
  stream of seeded permutations cut into global batches (`batch_indices`). A resumed run
  therefore sees exactly the batches an uninterrupted run would, with no iterator state to
  checkpoint; each process feeds its own slice of every global batch (`local_rows`).
* Checkpoints: one orbax CheckpointManager per run (`<workdir>/checkpoints`) holding the
  whole training state (one pytree) and a JSON item with the step and a data fingerprint;
  `restore_latest` restores onto the current mesh (any device count). Runs with a
  validation split also keep the weights of their best validation loss in `<workdir>/best`
  (`best_manager`, one step, orbax's best_fn), which `restore_weights(..., "best")` reads.
* The training loop (`train_loop`): steps, progress, metrics rows with images/s, loss
  plots, sample grids, the validation loss and checkpoints on the configured schedules.
* Plots: loss curves from metrics rows and image grids, PNG, written atomically with
  matplotlib's object API (no pyplot, no global backend).
"""

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from deepssim_jax import config_lib, fileio, parallel, plots, runs

# ----------------------------------------------------------------------------- data order


def batch_indices(num_items: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """The item indices of global batch `step` (0-based) of an endless seeded stream.

  The stream is permutation(epoch 0) ++ permutation(epoch 1) ++ ..., each permutation drawn
  from numpy's default_rng((seed, epoch)); batch s is stream[s * B:(s + 1) * B]. Works when
  num_items < global_batch (a batch then spans several epochs).
  """
  if num_items < 1:
    raise ValueError("batch_indices: no items to draw batches from")
  start = step * global_batch
  out = []
  epoch, offset = divmod(start, num_items)
  while len(out) < global_batch:
    perm = np.random.default_rng((seed, epoch)).permutation(num_items)
    take = perm[offset:offset + global_batch - len(out)]
    out.extend(take.tolist())
    epoch, offset = epoch + 1, 0
  return np.asarray(out, np.int64)


def local_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (processes feed equal contiguous shares)."""
  n = global_batch // jax.process_count()
  if n * jax.process_count() != global_batch:
    raise ValueError(f"global batch {global_batch} does not divide over "
                     f"{jax.process_count()} processes")
  return slice(jax.process_index() * n, (jax.process_index() + 1) * n)


def check_batch(global_batch: int, mesh) -> None:
  if global_batch % mesh.devices.size:
    raise ValueError(f"global batch {global_batch} is not divisible by the "
                     f"{mesh.devices.size} devices of the mesh; choose a multiple")


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process, sharded) array as one numpy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def num_steps(train: ml_collections.ConfigDict, num_items: int, global_batch: int) -> int:
  """train.num_steps if set, else ceil(train.num_epochs * num_items / global_batch)."""
  if train.get("num_steps", 0):
    return int(train.num_steps)
  if not train.get("num_epochs", 0):
    raise ValueError("config.train needs num_steps or num_epochs > 0")
  return int(np.ceil(train.num_epochs * num_items / global_batch))


# ----------------------------------------------------------------------------- checkpoints


def _options(name: str, **kw) -> ocp.CheckpointManagerOptions:
  # Two managers saving the same step from background threads need distinct barrier names
  # across processes (orbax's 'async_write_complete.<step>' would otherwise collide).
  return ocp.CheckpointManagerOptions(
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
      **kw)


def checkpoint_manager(workdir: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ocp.CheckpointManager(root, item_names=("state", "data"),
                               options=_options("latest", max_to_keep=keep, create=create))


def best_manager(workdir: str, create: bool = True) -> ocp.CheckpointManager:
  """The weights of the lowest validation loss (`<workdir>/best`, items weights + data)."""
  root = os.path.abspath(os.path.join(workdir, "best"))
  return ocp.CheckpointManager(root, item_names=("weights", "data"), options=_options(
      "best", max_to_keep=1, create=create, best_fn=lambda m: m["valid_loss"],
      best_mode="min"))


CHECKPOINTS = ("latest", "best")


def restore_weights(workdir: str, which: str, latest_target: Any, weights_of: Callable,
                    mesh, what: str) -> tuple[Any, dict]:
  """(weights, data) of a run: `weights_of(state)` of its latest checkpoint, or the weights
  of its best validation loss (data: step, valid_loss).

  Args:
    workdir: the run.
    which: "latest" or "best".
    latest_target: the abstract training state (restore target of the latest checkpoint).
    weights_of: state -> the weights a user of the run needs (e.g. the UNet's params).
    mesh: restore onto this mesh.
    what: the run's kind for messages ("autoencoder", "diffusion").

  Raises:
    InputError: no such checkpoint.
  """
  if which not in CHECKPOINTS:
    raise ValueError(f"checkpoint {which!r}: expected one of {CHECKPOINTS}")
  if which == "latest":
    mngr = checkpoint_manager(workdir, keep=1, create=False)
    restored = restore_latest(mngr, latest_target, mesh)
    mngr.close()
    if restored is None:
      raise fileio.InputError(f"{workdir}: no {what} checkpoint; train it first (--mode={what})")
    return weights_of(restored[0]), restored[1]
  root = os.path.join(workdir, "best")
  if not os.path.isdir(root):
    raise fileio.InputError(f"{root}: no best-validation {what} weights (the run has no "
                        "validation split: set data.valid_fraction > 0 when training, or use "
                        "the latest checkpoint)")
  mngr = best_manager(workdir, create=False)
  step = mngr.best_step()
  if step is None:
    mngr.close()
    raise fileio.InputError(f"{root}: no best-validation {what} weights yet")
  target = runs.abstract_like(jax.eval_shape(lambda: weights_of(latest_target)), mesh)
  restored = mngr.restore(step, args=ocp.args.Composite(
      weights=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  mngr.close()
  logging.info("Restored the best-validation %s weights of %s (step %d)", what, workdir, step)
  return restored["weights"], restored["data"]


def has_checkpoints(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))


def params_fingerprint(params) -> str:
  """A hash of (replicated) weights, read from this process's first copy."""
  leaves = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
            for x in jax.tree.leaves(params)]
  return fileio.fingerprint(*leaves)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data)))


def restore_latest(mngr: ocp.CheckpointManager, target: Any, mesh,
                   spec: Optional[dict] = None, workdir: str = "") -> Optional[tuple]:
  """(state, data) of the latest checkpoint restored onto `mesh`, or None if there is none.

  Raises:
    InputError: the checkpoint's data spec differs from `spec` (another run's workdir).
  """
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(runs.abstract_like(target, mesh)),
      data=ocp.args.JsonRestore()))
  data = restored["data"]
  if spec is not None and data.get("spec") != spec:
    raise fileio.InputError(f"{workdir}: its checkpoint was trained with other data/settings "
                        f"({data.get('spec')} vs {spec}); use a new workdir")
  logging.info("Resumed from %s at step %d", mngr.directory, step)
  return restored["state"], data


def check_config_unchanged(workdir: str, config: ml_collections.ConfigDict,
                           sections: Sequence[str]) -> None:
  """Refuses, naming what changed, a run whose network `sections` (e.g. model, disc, cond)
  differ from the config.json of a workdir that already holds checkpoints: their shapes
  would not restore (orbax would fail with a shape error).

  Raises:
    InputError: checkpoints exist and a section differs from the saved config.json's.
  """
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and has_checkpoints(workdir)):
    return
  with open(path) as f:
    saved = json.load(f)
  now = json.loads(config.to_json_best_effort())
  diff = []
  for name in sections:
    old, new = saved.get(name, {}), now.get(name, {})
    # A field an older config.json lacks is not compared (the overrides are, in full).
    new = {k: v for k, v in new.items() if k in old or k == "overrides"}
    diff += config_lib.config_changes(old, new, f"{name}.")
  if diff:
    raise fileio.InputError(f"{workdir}: its checkpoints were trained with other network "
                        f"settings ({'; '.join(diff)}); use a new workdir, or set these back "
                        f"to the values in {path}")


def tuples(d) -> dict:
  """A config dict's lists as tuples (JSON-restored configs give lists; flax wants tuples)."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(d).items()}


def start_or_resume(workdir: str, state: Any, mesh, spec: dict, keep: int
                    ) -> tuple[ocp.CheckpointManager, Any, int]:
  """(checkpoint manager, state, first step): the latest checkpoint of `workdir` if any
  (its spec must equal `spec`), else the fresh `state` at step 0."""
  mngr = checkpoint_manager(workdir, keep)
  restored = restore_latest(mngr, state, mesh, spec, workdir)
  if restored is None:
    return mngr, state, 0
  return mngr, restored[0], int(restored[1]["step"])

# ----------------------------------------------------------------------------- plots


def plot_losses(path: str, rows: Sequence[dict], keys: Sequence[str], title: str = "") -> str:
  """A PNG of the metrics `keys` against step (log scale where all values are positive)."""
  fig = plots.figure((6.4, 4.0))
  ax = fig.add_subplot(1, 1, 1)
  positive = True
  for k in keys:
    pts = [(float(r["step"]), float(r[k])) for r in rows if r.get(k, "") != ""]
    if pts:
      s, v = zip(*pts)
      ax.plot(s, v, label=k)
      positive &= min(v) > 0
  if positive:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_title(title)
  ax.legend(fontsize="small")
  fileio.write_bytes(path, plots.png(fig))
  return path


def image_grid(path: str, images: np.ndarray, ncols: int = 8, titles=None) -> str:
  """A PNG grid of (N, H, W) images, each min-max scaled on its own."""
  images = np.asarray(images, np.float32)
  n = len(images)
  ncols = max(1, min(ncols, n))
  nrows = int(np.ceil(n / ncols))
  h, w = images.shape[1:3]
  fig = plots.figure((1.6 * ncols * w / max(h, w) + 0.2, 1.6 * nrows * h / max(h, w) + 0.2))
  for i, x in enumerate(images):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    ax.imshow(x, cmap="gray")
    ax.set_axis_off()
    if titles is not None:
      ax.set_title(str(titles[i]), fontsize=6)
  fileio.write_bytes(path, plots.png(fig, pad=0.2))
  return path


def mean_rows(fetched: Sequence[dict]) -> dict:
  return {k: float(np.mean([float(m[k]) for m in fetched])) for k in fetched[0]}


# ----------------------------------------------------------------------------- training loop

def train_loop(state: Any, step_fn: Callable[[Any, int], tuple[Any, dict]], *, start: int,
               total: int, train: ml_collections.ConfigDict, log, mngr: ocp.CheckpointManager,
               spec: dict, workdir: str, desc: str, plot_keys: Sequence[str],
               on_sample: Callable[[Any, int], None], stop_after: Optional[int] = None,
               valid: Optional[dict] = None) -> tuple[Any, int, dict]:
  """Runs `state, metrics = step_fn(state, step)` for step = start .. total - 1.

  Every train.log_every_steps (and at the end) the mean of the pending metrics, with the
  images/s since the last row, goes to `log` (a MetricsLog) and loss.png (process 0);
  `on_sample(state, step)` runs every train.sample_every_steps (0: never) and at the end;
  with `valid` = dict(fn: state -> validation loss, every: steps, weights: state -> the
  weights to keep, mngr: best_manager) the validation loss is logged (valid_loss) every
  `every` steps and at the end, and the weights saved to the best manager, which keeps
  the lowest; the state is checkpointed with `spec` every train.checkpoint_every_steps
  and at the end. Stops early after `stop_after` steps (tests of resumption). Closes the
  checkpoint managers.

  Returns:
    (state, the step reached, the last metrics row).
  """
  bar = tqdm(total=total, initial=start, desc=desc, unit="step",
             disable=not parallel.is_main_process())
  pending, t0, n0, row = [], time.perf_counter(), start, {}
  keys = tuple(plot_keys) + (() if valid is None else ("valid_loss",))
  step = start
  while step < total:
    state, metrics = step_fn(state, step)
    step += 1
    pending.append(metrics)
    bar.update(1)
    if step % train.log_every_steps == 0 or step == total:
      row = mean_rows(jax.device_get(pending))
      pending = []
      row["images_per_s"] = (step - n0) * train.batch_size / max(time.perf_counter() - t0,
                                                                 1e-9)
      t0, n0 = time.perf_counter(), step
      log.write(step, row)
      bar.set_postfix({plot_keys[0]: f"{row[plot_keys[0]]:.4f}"})
      if parallel.is_main_process():
        plot_losses(os.path.join(workdir, "loss.png"), log.rows, keys, desc)
    if train.sample_every_steps and (step % train.sample_every_steps == 0 or step == total):
      on_sample(state, step)
    if valid is not None and (step % valid["every"] == 0 or step == total):
      v = float(valid["fn"](state))
      log.write(step, {"valid_loss": v})
      if parallel.is_main_process():
        plot_losses(os.path.join(workdir, "loss.png"), log.rows, keys, desc)
      logging.info("%s: step %d, validation loss %.5f", desc, step, v)
      if step not in valid["mngr"].all_steps():  # a resumed run may reach it again
        valid["mngr"].save(step, args=ocp.args.Composite(
            weights=ocp.args.StandardSave(valid["weights"](state)),
            data=ocp.args.JsonSave({"step": step, "valid_loss": v, "spec": spec})),
            metrics={"valid_loss": v})
    if step % train.checkpoint_every_steps == 0 or step == total:
      save(mngr, step, state, {"step": step, "spec": spec})
    if stop_after is not None and step - start >= stop_after:
      break
  bar.close()
  for m in (mngr, None if valid is None else valid["mngr"]):
    if m is not None:
      m.wait_until_finished()
      m.close()
  return state, step, row


def batched_mean(fn: Callable, rows_to_batch: Callable[[np.ndarray], Any], n: int,
                 global_batch: int, mesh) -> float:
  """The mean over n items of fn(batch) -> per-item values (B,), in global batches of
  rows 0 .. n-1 (the last padded by repeating its final row; padded values are dropped),
  each process feeding its own slice of every batch (rows_to_batch: rows -> its batch)."""
  local = local_rows(global_batch)
  total = 0.0
  for i in range(0, n, global_batch):
    rows = parallel.pad_to(np.arange(i, min(i + global_batch, n)), global_batch)[local]
    values = to_host(fn(parallel.shard_batch(rows_to_batch(rows), mesh)))
    total += float(np.sum(values[:min(global_batch, n - i)]))
  return total / n


def valid_every(train: ml_collections.ConfigDict, num_items: int, global_batch: int) -> int:
  """Steps between validations: train.valid_every_steps, or with 0 one epoch (the
  reference validates after every epoch)."""
  return int(train.get("valid_every_steps", 0)) or max(1, -(-num_items // global_batch))
