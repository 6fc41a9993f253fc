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
"""

import functools
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from deepssim_jax import parallel
from deepssim_jax.data import write_png
from ldm_jax import common, train_diffusion


def gen_name(i: int) -> str:
  return f"gen-{i}.png"


def is_complete(folder: str, num_samples: int) -> bool:
  return (os.path.isfile(os.path.join(folder, "training.png"))
          and all(os.path.isfile(os.path.join(folder, gen_name(i)))
                  for i in range(num_samples)))


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
  params, step = train_diffusion.load_unet(workdir, config, run["model"], latent_shape, mesh)
  params = parallel.replicate(params, mesh)
  n_samples = gc.num_samples
  todo = [r for r, uid in enumerate(records["uids"])
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
          folder = os.path.join(out_dir, records["uids"][rr])
          write_png(os.path.join(folder, "training.png"), records["images"][rr])
          for k, g in sorted(buffer[int(rr)].items()):
            write_png(os.path.join(folder, gen_name(k)), g)
        written.append(records["uids"][rr])
        del buffer[int(rr)]
  return {"out_dir": out_dir, "written": written, "skipped": skipped, "step": step}
