"""Registration before scoring (ours): DeepSSIM of b rigidly aligned onto a.

A small network is only as invariant to rotation as its augmentation made it: a copy
rotated by 6-10 degrees scores well below the same copy unrotated (leave-one-head-out,
deepssim_jax/pretrained/MODEL_CARD.md). Aligning first removes that dependence. For each
pair (a, b) every rigid candidate phi of b (`geometry.transform`: the four flip states x
rotation angles on a grid, as `ssim.aligned_ssim` tries them) is z-scored again, and the
candidate whose pixels correlate best with a's (Pearson correlation over the image, a dot
product of centred unit rows, so a whole (N, M) matrix is one matmul per candidate)
is the alignment; the score is the embedding cosine of a and phi(b).

The alignment is picked by pixel correlation, not by the cosine itself: a maximum of the
cosine over candidates would lift every pair, neighbours and unrelated slices included
(measured: Similar recall 0.54 -> 0.30 on a held-out head), where a correlation peak moves
only pairs that a rigid transform really brings into register. The identity is visited
first and kept on ties (correlations within TIE), so a pair already in register scores its
plain cosine.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from deepssim_jax import geometry
from deepssim_jax.data import images as images_lib

# The default grid: rotations of -9 to 9 degrees in 3-degree steps, with flips (28 candidates).
MAX_ANGLE = float(np.deg2rad(9.0))
ANGLE_STEP = float(np.deg2rad(3.0))
# Correlations within this of the best so far are ties (kept by the earlier candidate):
# float32 dot products of 10^4-pixel unit rows differ by ~1e-6 between a matrix product and
# a row-wise sum, and a symmetric image's flips tie exactly, so without it the matrix and
# the pairs mode could pick different candidates of one pair.
TIE = 1e-5


def angle_grid(max_angle: float = MAX_ANGLE, step: float = ANGLE_STEP) -> np.ndarray:
  """(K,) rotation angles in radians: 0, +-step, +-2 step ... up to max_angle (0 first)."""
  if max_angle < 0 or step <= 0:
    raise ValueError(f"align: max_angle {max_angle} must be >= 0 and step {step} > 0")
  n = int(np.floor(max_angle / step + 1e-9))
  k = np.arange(1, n + 1)
  return np.concatenate([[0.0], np.stack([k, -k], 1).ravel() * step]).astype(np.float32)


@jax.jit
def _candidate(x: jax.Array, t: jax.Array, angles: jax.Array) -> jax.Array:
  return images_lib.zscore(geometry.transform(x, t, angles), xp=jnp)


def candidates(x: np.ndarray, t: int, angles: np.ndarray) -> np.ndarray:
  """Candidate t (geometry.transform's order) of a stack (N, H, W), z-scored again."""
  return np.asarray(_candidate(jnp.asarray(x, jnp.float32), t, jnp.asarray(angles)))


def unit_rows(x: np.ndarray) -> np.ndarray:
  """(N, H W) rows centred and scaled to unit norm: their dot product is Pearson's r."""
  r = np.asarray(x, np.float64).reshape(len(x), -1)
  r = r - r.mean(axis=1, keepdims=True)
  return (r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def aligned_scores(embed: Callable[[np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray,
                   angles: np.ndarray | None = None, flips: bool = True,
                   pairs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cosines of a and b aligned onto a (module docstring).

  Args:
    embed: (K, H, W) z-scored images -> (K, D) unit embeddings (a model's `embed`).
    a: (N, H, W) z-scored images (left as they are).
    b: (M, H, W) z-scored images (transformed).
    angles: rotation angles in radians with 0 first (angle_grid()); None: the default grid.
    flips: also the left-right, up-down and both flips.
    pairs: None for every (i, j), or (P, 2) rows (i of a, j of b).

  Returns:
    (scores, chosen candidates): (N, M) or (P,) float32 cosines and int32 candidate indices
    (geometry.transform's order; 0 is the identity).
  """
  angles = angle_grid() if angles is None else np.asarray(angles, np.float32)
  if angles[0] != 0:
    raise ValueError("align: angles must start with 0 (the identity is visited first)")
  ea, ua = embed(a), unit_rows(a)
  if pairs is not None:
    pairs = np.asarray(pairs)
    ea, ua = ea[pairs[:, 0]], ua[pairs[:, 0]]
  best_r = best = chosen = None
  for t in range(int(geometry.num_candidates(angles, flips))):
    xb = candidates(b, t, angles)
    eb, ub = embed(xb), unit_rows(xb)
    if pairs is None:
      r, cos = ua @ ub.T, ea @ eb.T
    else:
      j = pairs[:, 1]
      r, cos = np.sum(ua * ub[j], axis=1), np.sum(ea * eb[j], axis=1)
    if best_r is None:
      best_r, best, chosen = r, cos, np.zeros(r.shape, np.int32)
    else:
      better = r > best_r + TIE
      best_r, best = np.where(better, r, best_r), np.where(better, cos, best)
      chosen = np.where(better, t, chosen).astype(np.int32)
  return best.astype(np.float32), chosen


def _take(images: Any, rows: np.ndarray) -> np.ndarray:
  """(len(rows), H, W) float32: rows of an array, or of a random-access source ([i])."""
  if isinstance(images, np.ndarray):
    return np.asarray(images[rows], np.float32)
  return np.stack([np.asarray(images[int(r)], np.float32) for r in rows])


def best_unique(scores: np.ndarray, idx: np.ndarray, m: int) -> np.ndarray:
  """(N, m) int64: each row's m best distinct entries of idx by score (a reference row
  found several times counts once, at its best score), best first."""
  order = np.lexsort((-scores, idx), axis=1)  # by reference row, then best score first
  idx, scores = np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)
  repeat = np.zeros(idx.shape, bool)
  repeat[:, 1:] = idx[:, 1:] == idx[:, :-1]
  top = np.argsort(-np.where(repeat, -np.inf, scores), axis=1, kind="stable")[:, :m]
  return np.take_along_axis(idx, top, 1).astype(np.int64)


def flip_candidates(embed: Callable[[np.ndarray], np.ndarray], query: Any,
                    query_emb: np.ndarray, reference_emb: np.ndarray, m: int,
                    topk: Callable[..., tuple[np.ndarray, np.ndarray]], chunk: int = 1024,
                    progress: bool = False, desc: str = "candidates") -> np.ndarray:
  """(N, m) candidate reference rows of each query row for rerank: the m best by plain
  cosine over the query image's four flip states (the alignment's flips). A network
  trained without flips (config.model.align) scores a flipped copy's source low in plain
  cosine, so its source would not be among the plain nearest; with the query flipped back
  it is. Costs three more embeddings per query image.

  Args:
    embed: as in aligned_scores.
    query: z-scored query images ((N, H, W) array or random-access source).
    query_emb, reference_emb: (N, D) and (M, D) unit embeddings of the plain images.
    m: candidates per query row (at most M).
    topk: (query embeddings, reference embeddings, n) -> (scores, indices) of each query
      row's n best (deepssim_jax.match.topk_match).
    chunk, progress, desc: query rows per step and a tqdm bar over the chunks.
  """
  m = min(int(m), len(reference_emb))
  out = []
  for start in tqdm(range(0, len(query_emb), chunk), desc=desc, unit="chunk",
                    disable=not progress):
    rows = np.arange(start, min(len(query_emb), start + chunk))
    x = _take(query, rows)
    e = np.concatenate([np.asarray(query_emb[start:start + len(rows)], np.float32)]
                       + [embed(np.ascontiguousarray(np.flip(x, axes)))
                          for axes in ((1,), (2,), (1, 2))])
    s, i = topk(e, reference_emb, m)  # (4 c, m): the four flip states stacked
    regroup = lambda v: np.concatenate(np.split(np.asarray(v), 4), axis=1)  # noqa: E731
    out.append(best_unique(regroup(s), regroup(i), m))
  return np.concatenate(out) if out else np.zeros((0, m), np.int64)


def rerank(embed: Callable[[np.ndarray], np.ndarray], query: Any, reference: Any,
           idx: np.ndarray, k: int, chunk: int = 1024, angles: np.ndarray | None = None,
           progress: bool = False, desc: str = "align") -> tuple[np.ndarray, np.ndarray]:
  """Scores each query row's plain nearest candidates again after alignment and keeps the
  best k (descending; a stable sort, so ties keep the plain order).

  Args:
    embed: as in aligned_scores.
    query, reference: z-scored images, (N, H, W) arrays or random-access sources
      (len, [i] -> (H, W)); only the rows used are read.
    idx: (N, m) candidate reference rows of each query row (flip_candidates), m >= k.
    k: neighbours kept per query row.
    chunk: query rows per step: their images and the reference rows they name are read,
      every candidate of those reference rows is embedded (28x them), then let go.
    angles, progress, desc: the grid (aligned_scores) and a tqdm bar over the chunks.

  Returns:
    scores (N, k) float32 and indices (N, k) int64 into the reference.
  """
  idx = np.asarray(idx, np.int64)
  if idx.ndim != 2 or not 1 <= k <= idx.shape[1]:
    raise ValueError(f"align.rerank: k={k} must be between 1 and the {idx.shape[-1]} "
                     "candidates per row")
  if chunk < 1:
    raise ValueError(f"align.rerank: chunk must be >= 1, got {chunk}")
  scores, kept = [], []
  for start in tqdm(range(0, len(idx), chunk), desc=desc, unit="chunk", disable=not progress):
    rows = idx[start:start + chunk]
    used, col = np.unique(rows, return_inverse=True)
    pairs = np.stack([np.repeat(np.arange(len(rows)), rows.shape[1]), col.ravel()], 1)
    s = aligned_scores(embed, _take(query, np.arange(start, start + len(rows))),
                       _take(reference, used), angles, pairs=pairs)[0].reshape(rows.shape)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores.append(np.take_along_axis(s, order, 1))
    kept.append(np.take_along_axis(rows, order, 1))
  return (np.concatenate(scores).astype(np.float32) if scores else np.zeros((0, k), np.float32),
          np.concatenate(kept) if kept else np.zeros((0, k), np.int64))
