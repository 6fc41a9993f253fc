"""Embedding images with a trained DeepSSIM: jitted, data-parallel, last batch padded."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from deepssim_jax import parallel


def make_embed_fn(model):
  """A jitted (variables, images (B, H, W)) -> L2-normalised embeddings (B, D)."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def embed_array(model, variables, images: np.ndarray, batch_size: int, mesh=None,
                progress: bool = True, embed_fn=None) -> np.ndarray:
  """Embeds an in-memory (N, H, W) stack in fixed-size batches sharded over the mesh."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  n_dev = mesh.devices.size
  batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
  embed_fn = make_embed_fn(model) if embed_fn is None else embed_fn
  variables = parallel.replicate(variables, mesh)
  out = []
  t0 = time.perf_counter()
  for start in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch",
                    disable=not progress):
    x = np.asarray(images[start:start + batch_size], np.float32)
    n = len(x)
    e = embed_fn(variables, parallel.shard_batch(parallel.pad_to(x, batch_size), mesh))
    out.append(np.asarray(jax.device_get(e))[:n])
  dt = time.perf_counter() - t0
  logging.info("Embedded %d images in %.1f s (%.1f img/s)", len(images), dt,
               len(images) / max(dt, 1e-9))
  return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


def cosine_pairs(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of already-normalised embeddings."""
  return np.sum(np.asarray(emb_a, np.float64) * np.asarray(emb_b, np.float64), axis=-1)
