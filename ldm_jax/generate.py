"""Generation job: N synthetic images per training record, in the layout DeepSSIM reads.

For every unique training record of a diffusion run (the images it was trained on),
`generate` draws generate.num_samples samples with DDIM (sample.num_inference_steps steps,
eta sample.eta; the reference: 30 samples, 50 steps, eta 0), conditioned on that record's
covariates when the model is conditioned, decodes them with the frozen first stage and
writes

  <out>/<uid>/training.png   the training image
  <out>/<uid>/gen-<i>.png    i = 0 .. N-1

as 8-bit PNGs, min-max scaled, atomically (deepssim_jax.data.write_png). Samples are
batched across records (generate.batch_size, padded, data-parallel over the mesh). The
starting noise of sample i of record r depends only on (generate.seed, r, i), so the
output does not depend on the batch size or device count, and the job is resumable: a
uid whose N generated files all exist is skipped; an incomplete one is redone.

<out>.record.json (beside the folder, so that the folder holds the layout alone) records
what the samples were made with (generation_record: seed,
DDIM steps and eta, the diffusion checkpoint's step and a fingerprint of its weights, the
first stage, schedule and training records, and bfloat16 compute when
train.mixed_precision is on). A rerun with other settings is refused, naming
what changed, rather than skipping "complete" folders of old samples or overwriting them:
samples are expensive and may already be audited, and overwriting in place would leave a
mix of both settings if interrupted. Only num_samples may grow (sample i depends on
(seed, record, i) alone, so the old samples are those a fresh run would write).

Each record's folder name (its uid) must be a plain, visible folder name: no path
separator, not '.' or '..', no leading '.', and two keys may not share one (e.g. 'a/b' and
'a-b'); otherwise the job stops before writing anything, naming the keys.
"""

import functools
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from deepssim_jax import config_lib, fileio, parallel
from deepssim_jax.data import write_png
from ldm_jax import common, train_diffusion


def gen_name(i: int) -> str:
  return f"gen-{i}.png"


def is_complete(folder: str, num_samples: int) -> bool:
  return (os.path.isfile(os.path.join(folder, "training.png"))
          and all(os.path.isfile(os.path.join(folder, gen_name(i)))
                  for i in range(num_samples)))


def record_path(out_dir: str) -> str:
  """The record of an output folder: <out_dir>.record.json beside it."""
  return os.path.normpath(os.path.abspath(out_dir)) + ".record.json"


def output_folders(keys, uids) -> list[str]:
  """The folder name of each record, checked: a plain visible name (no '/', '\\' or NUL,
  not '.' or '..', no leading '.': the layout reader skips hidden folders), unique.

  Raises:
    InputError: naming the key of a bad name, or both keys of a shared one.
  """
  seen = {}
  for key, uid in zip(keys, uids):
    uid = str(uid)
    if (not uid or uid in (".", "..") or uid.startswith(".")
        or any(c in uid for c in ("/", "\\", "\0"))):
      raise fileio.InputError(f"training record {str(key)!r}: its output folder name {uid!r} is "
                          "not a plain folder name (no path separators, not '.' or '..', no "
                          "leading '.'); rename the image (key)")
    if uid in seen:
      raise fileio.InputError(f"training records {seen[uid]!r} and {str(key)!r} map to one output "
                          f"folder {uid!r}; rename one of the images (keys)")
    seen[uid] = str(key)
  return [str(u) for u in uids]


def generation_record(config: ml_collections.ConfigDict, run: dict, step: int,
                      checkpoint: str, which: str = "latest") -> dict:
  """What the samples of a generation are made with (JSON-ready): `checkpoint` is the
  weights' fingerprint, `which` the checkpoint they came from (latest or best)."""
  gc, records = config.generate, run["records"]
  rec = {"version": 1, "seed": int(gc.seed), "num_samples": int(gc.num_samples),
         "num_inference_steps": int(config.sample.num_inference_steps),
         "eta": float(config.sample.eta), "checkpoint_step": int(step),
         "checkpoint": checkpoint, "checkpoint_kind": which,
         "ema": train_diffusion.uses_ema(config),
         "first_stage": str(run["stage"]["fingerprint"]),
         "latent_scale": float(run["latents"]["scale"]),
         "latent_pad_mode": config.latent.get("pad_mode", "end"),
         "schedule": {k: v for k, v in config.schedule.to_dict().items()},
         "cond": config.cond.kind,
         "records": fileio.fingerprint(records["images"], *records["keys"])}
  # The UNet's compute dtype (train.mixed_precision: bfloat16) changes the samples; float32
  # is not recorded, so the records of samples generated before this field stay valid.
  if config.train.get("mixed_precision", False):
    rec["compute_dtype"] = "bfloat16"
  return json.loads(json.dumps(rec, sort_keys=True, default=str))


def generation_changes(old: dict, new: dict) -> list[str]:
  """What differs between the record of existing samples and this run's (num_samples may
  grow)."""
  a, b = old.get("num_samples"), new.get("num_samples")
  grows = isinstance(a, int) and isinstance(b, int) and b > a
  skip = {"num_samples"} if grows else set()
  return config_lib.config_changes({k: v for k, v in old.items() if k not in skip},
                                   {k: v for k, v in new.items() if k not in skip}, "")


def check_out_dir(out_dir: str, record: dict) -> dict | None:
  """Refuses an output folder holding samples of other settings (the module docstring);
  returns the record of the samples already there (None: none)."""
  path = record_path(out_dir)
  hint = (f"use another output folder (--config.generate.out_dir=...) or remove {out_dir} "
          "to generate again")
  # The record describes the folder's samples: once the folder is removed it describes
  # nothing (the hint's advice), and this run's record replaces it.
  if os.path.isfile(path) and os.path.isdir(out_dir):
    try:
      with open(path, encoding="utf-8") as f:
        old = json.load(f)
    except ValueError:
      raise fileio.InputError(f"{path}: unreadable record of the samples in {out_dir}; "
                          f"{hint}") from None
    diff = generation_changes(old, record)
    if diff:
      raise fileio.InputError(f"{out_dir}: holds samples generated with other settings "
                          f"({'; '.join(diff)}); {hint}")
    return old
  if os.path.isdir(out_dir):
    for name in os.listdir(out_dir):
      folder = os.path.join(out_dir, name)
      if os.path.isdir(folder) and any(n == "training.png" or n.startswith("gen-")
                                       for n in os.listdir(folder)):
        raise fileio.InputError(f"{out_dir}: holds generated samples ({folder}) but no record "
                            f"({path}) of the settings they were made with; {hint}")
  return None


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(base: jax.Array, record: jax.Array, index: jax.Array, shape) -> jax.Array:
  """x_T of sample `index` of `record` (arrays of equal length): a function of
  (base key, record, index) only, so independent of batching and devices."""
  def one(r, i):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, r), i), shape)
  return jax.vmap(one)(record, index)


def generate(config: ml_collections.ConfigDict, workdir: str, mesh=None,
             out_dir: Optional[str] = None, stop_after: Optional[int] = None) -> dict:
  """Writes the samples of a trained diffusion run (module docstring).

  Args:
    config: the diffusion run's config (generate.num_samples, batch_size, seed, out_dir).
    workdir: the diffusion run's workdir (checkpoints, latents.npz, training.npz).
    mesh: device mesh (default: all devices).
    out_dir: destination (default generate.out_dir, else <workdir>/generated).
    stop_after: stop as if killed after this many batches (tests).

  Returns:
    dict(out_dir, written (uids completed now), skipped (uids already complete), step).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  gc = config.generate
  out_dir = out_dir or gc.get("out_dir", "") or os.path.join(workdir, "generated")
  run = train_diffusion.prepare(config, workdir, mesh)
  records, lat, ctx = run["records"], run["latents"], run["context"]
  latent_shape = lat["mu"].shape[1:]
  folders = output_folders(records["keys"], records["uids"])
  which = gc.get("checkpoint", "latest")
  params, step = train_diffusion.load_unet(workdir, config, run, mesh, which)
  record = generation_record(config, run, step, common.params_fingerprint(params), which)
  if check_out_dir(out_dir, record) != record and parallel.is_main_process():
    # before any sample, so an interrupted run's samples are attributed to their settings
    fileio.write_json(record_path(out_dir), record)
  parallel.sync("generation record written")
  params = parallel.replicate(params, mesh)
  n_samples = gc.num_samples
  todo = [r for r, uid in enumerate(folders)
          if not is_complete(os.path.join(out_dir, uid), n_samples)]
  skipped = len(records["uids"]) - len(todo)
  logging.info("Generating %d samples for each of %d records (%d already complete) from step "
               "%d into %s", n_samples, len(todo), skipped, step, out_dir)
  jobs_r = np.repeat(np.asarray(todo, np.int64), n_samples)
  jobs_i = np.tile(np.arange(n_samples), len(todo))
  n_dev = mesh.devices.size
  b = -(-gc.batch_size // n_dev) * n_dev
  sample_fn = train_diffusion.make_sample_fn(config, run)
  local = common.local_rows(b)
  buffer, written = {}, []
  batches = range(0, len(jobs_r), b)
  for n_batch, start in enumerate(tqdm(batches, desc="generate", unit="batch",
                                       disable=not parallel.is_main_process())):
    if stop_after is not None and n_batch >= stop_after:
      break
    r = parallel.pad_to(jobs_r[start:start + b], b)
    i = parallel.pad_to(jobs_i[start:start + b], b)
    m = min(b, len(jobs_r) - start)
    x_T = np.asarray(initial_noise(jax.random.key(gc.seed), r[local], i[local],
                                   tuple(latent_shape)))
    c = None if ctx is None else parallel.shard_batch(ctx[r[local]], mesh)
    imgs = common.to_host(sample_fn(params, parallel.shard_batch(x_T, mesh), c,
                                    rng=jax.random.key(gc.seed)))
    for rr, ii, img in zip(r[:m], i[:m], imgs[:m]):
      buffer.setdefault(int(rr), {})[int(ii)] = img
      if len(buffer[int(rr)]) == n_samples:
        if parallel.is_main_process():
          folder = os.path.join(out_dir, folders[rr])
          write_png(os.path.join(folder, "training.png"), records["images"][rr])
          for k, g in sorted(buffer[int(rr)].items()):
            write_png(os.path.join(folder, gen_name(k)), g)
        written.append(folders[rr])
        del buffer[int(rr)]
  return {"out_dir": out_dir, "written": written, "skipped": skipped, "step": step,
          "record": record}
