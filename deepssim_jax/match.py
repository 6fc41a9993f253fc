"""Nearest-training-image search: exact streaming cosine top-k.

The audit question is "which training image is each synthetic image closest to?". The
reference answers it by materialising the full training x synthetic cosine matrix (float16),
which at 20,000 x 600,000 is 24 GB (48 GB in float32). Here the matrix is never formed:
reference (training) embeddings stream through the devices block by block, every query
(synthetic) row keeps a running top-k of (score, reference index), and memory is bounded by
the block sizes plus the (Nq, d) queries and (Nq, k) results. (The reference's full matrix,
for small sets and its eval.py, is deepssim_jax.ref_matrix.)

Layout: query rows are sharded over a 1-D "data" mesh (deepssim_jax.parallel), each
reference block is replicated; each device loops (lax.map) over sub-blocks of its queries,
so there is no communication at all. Last blocks are padded to fixed shapes (padding query
rows are dropped; padding reference columns score -inf), so nothing recompiles.

Exactness and ties: results are exact top-k under one total order, (score descending,
reference index ascending); -0.0 scores are turned into +0.0 first so the order matches
plain numeric comparison. jax.lax.top_k is documented to put the lower index first among
equal values; every step keeps candidate positions increasing with the reference index
(running results before the new block, chunks in column order), so that rule yields the
lower reference index. A brute-force equivalent is a stable argsort of -scores.

The per-block top-k can cost as much as the matmul on CPU (lax.top_k is a partial sort). With
`chunk` > 0 the block's columns are cut into chunks of `chunk` columns; the k chunks with
the largest maxima are gathered and only they are searched. This is exact: all top-k
elements are >= the k-th largest chunk maximum, so they lie in those chunks (with ties,
lax.top_k's lower-chunk-first rule keeps the lowest-index tied elements).
"""

import functools
from typing import Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from deepssim_jax import fileio, parallel, store

_NEG_INF = float("-inf")
# Precision of the float32 dot: "highest" keeps full float32 on GPUs/TPUs (TF32/bf16 passes
# would change the ranking); it is a no-op on CPU.
PRECISION = jax.lax.Precision.HIGHEST


def normalize(x: np.ndarray, name: str = "embeddings", normalize_rows: bool = True,
              tol: float = 1e-3) -> np.ndarray:
  """L2-normalises rows to float32 on the host, refusing zero or non-finite rows.

  Args:
    x: (n, d) floating-point array.
    name: what the array is (a store folder, "query"), for error messages.
    normalize_rows: False only checks that rows already have unit norm (within tol).
    tol: tolerance of that check.

  Returns:
    (n, d) float32 unit rows.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name}: need a (n, d) array, got shape {x.shape}")
  x = x.astype(np.float32, copy=False)
  sq = np.einsum("ij,ij->i", x, x)  # float32 accumulation: 7x faster than float64 here
  bad = np.flatnonzero(~np.isfinite(sq) | (sq == 0))
  if len(bad):
    raise ValueError(f"{name}: row {int(bad[0])} is zero or not finite; cannot normalise")
  norm = np.sqrt(sq)
  if not normalize_rows:
    off = np.flatnonzero(np.abs(norm - 1) > tol)
    if len(off):
      raise ValueError(f"{name}: row {int(off[0])} has norm {norm[off[0]]:.6g}, not 1")
    return x
  return x / norm[:, None]


def _zero_fix(x):
  # -0.0 -> +0.0, so lax.top_k's total order (-0.0 below +0.0) is numeric order.
  return jnp.where(x == 0, 0.0, x)


def _block_topk(q, r, n_valid, k: int, chunk: int):
  """Top-k of q @ r.T per row over the first n_valid columns; returns (scores, columns)."""
  s = jnp.dot(q, r.T, precision=PRECISION, preferred_element_type=jnp.float32)
  rows, rb = s.shape
  kk = min(k, rb)
  if chunk and rb % chunk == 0 and 2 * kk * chunk <= rb:
    # Chunk maxima straight from the matmul output (no full-size mask pass); only the one
    # chunk that straddles n_valid needs a masked maximum, and all-padding chunks get -inf.
    n_chunks = rb // chunk
    s3 = s.reshape(rows, n_chunks, chunk)
    first = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    edge = jnp.minimum(n_valid // chunk, n_chunks - 1)
    edge_vals = jax.lax.dynamic_index_in_dim(s3, edge, axis=1, keepdims=False)
    edge_cols = edge * chunk + jnp.arange(chunk, dtype=jnp.int32)
    edge_max = jnp.where(edge_cols < n_valid, edge_vals, _NEG_INF).max(axis=-1)
    m = jnp.where(first + chunk <= n_valid, s3.max(axis=-1),
                  jnp.where(first < n_valid, edge_max[:, None], _NEG_INF))
    _, best = jax.lax.top_k(_zero_fix(m), kk)
    best = jnp.sort(best, axis=-1)  # candidate positions increase with the column index
    cand = jnp.take_along_axis(s3, best[:, :, None], axis=1)
    cand_cols = best[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)
    cand = jnp.where(cand_cols < n_valid, _zero_fix(cand), _NEG_INF)
    v, j = jax.lax.top_k(cand.reshape(rows, kk * chunk), kk)
    cols = jnp.take_along_axis(best, j // chunk, axis=1) * chunk + j % chunk
  else:
    col = jnp.arange(rb, dtype=jnp.int32)
    v, cols = jax.lax.top_k(jnp.where(col[None, :] < n_valid, _zero_fix(s), _NEG_INF), kk)
  if kk < k:  # a block narrower than k: pad with -inf entries that any real score beats
    pad = k - kk
    v = jnp.concatenate([v, jnp.full((rows, pad), _NEG_INF, v.dtype)], axis=1)
    cols = jnp.concatenate([cols, jnp.full((rows, pad), rb, cols.dtype)], axis=1)
  return v, cols.astype(jnp.int32)


def _merge_topk(s, i, bs, bi):
  """Merges two (rows, k) top-k lists whose indices in `s, i` all precede those in bs, bi."""
  k = s.shape[1]
  v, p = jax.lax.top_k(jnp.concatenate([s, bs], axis=1), k)
  return v, jnp.take_along_axis(jnp.concatenate([i, bi], axis=1), p, axis=1)


block_topk = jax.jit(_block_topk, static_argnames=("k", "chunk"))
block_topk.__doc__ = """Jitted top-k of one (query block, reference block) pair.

Args:
  q: (qb, d) float32 unit rows.
  r: (rb, d) float32 unit rows.
  n_valid: columns >= n_valid are padding (score -inf).
  k: results per row.
  chunk: columns per chunk of the exact chunk-max prefilter (0: plain lax.top_k).

Returns:
  scores (qb, k) float32 descending, columns (qb, k) int32 (lower column first on ties).
"""
merge_topk = jax.jit(_merge_topk)
merge_topk.__doc__ = """Jitted merge of a running top-k with a later block's top-k (same k)."""


@functools.lru_cache(maxsize=32)
def _step_fn(mesh: Mesh, k: int, q_sub: int, chunk: int):
  """The jitted per-reference-block step, cached per (mesh, k, q_sub, chunk)."""

  def local(q, run_s, run_i, r, n_valid, offset):
    nl, d = q.shape

    def body(xs):
      qb, s, i = xs
      bs, bi = _block_topk(qb, r, n_valid, k, chunk)
      return _merge_topk(s, i, bs, bi + offset)

    n_sub = nl // q_sub
    s, i = jax.lax.map(body, (q.reshape(n_sub, q_sub, d), run_s.reshape(n_sub, q_sub, k),
                              run_i.reshape(n_sub, q_sub, k)))
    return s.reshape(nl, k), i.reshape(nl, k)

  # Query rows (and their running results) are sharded; the reference block and the
  # scalars are replicated. No collective is needed.
  data = P(parallel.DATA_AXIS)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(data, data, data, P(), P(), P()),
                               out_specs=(data, data), check_vma=False))


def _default_mesh(mesh: Optional[Mesh]) -> Mesh:
  # Local devices: in a multi-process job each process matches its own query rows.
  return parallel.make_mesh(jax.local_devices()) if mesh is None else mesh


def topk_match_blocks(query_emb: np.ndarray, ref_blocks: Iterable[np.ndarray], n_ref: int,
                      k: int, q_block: int = 256, r_block: int = 8192,
                      mesh: Optional[Mesh] = None, chunk: int = 64,
                      normalize_rows: bool = True, progress: bool = False,
                      ref_name: str = "reference") -> tuple[np.ndarray, np.ndarray]:
  """Exact cosine top-k of every query row over a stream of reference blocks.

  Args:
    query_emb: (Nq, d) query embeddings (synthetic images), held on the devices.
    ref_blocks: iterable of (m, d) reference blocks in reference order, m <= r_block
      (streamed: only one block is on the host at a time).
    n_ref: total reference rows (for progress and checks).
    k: neighbours per query (1 <= k <= n_ref).
    q_block: query rows per device per matmul (a sub-block; memory ~ q_block x r_block).
    r_block: reference rows per step (blocks are padded to it). topk_match and
      match_stores shrink it to balance the blocks (see balanced_block).
    mesh: 1-D "data" mesh; default all local devices.
    chunk: columns per chunk of the exact chunk-max prefilter (0: plain lax.top_k).
    normalize_rows: normalise both sides (True) or only check unit norms (False).
    progress: show a tqdm bar in pairs/s.
    ref_name: names the reference in error messages.

  Returns:
    scores (Nq, k) float32, descending per row; indices (Nq, k) int64 into the reference,
    ties broken by the lower reference index.
  """
  mesh = _default_mesh(mesh)
  n_dev = mesh.devices.size
  q = normalize(query_emb, "query", normalize_rows)
  nq, d = q.shape
  if not 1 <= k <= n_ref:
    raise ValueError(f"k={k} must be between 1 and the number of reference rows ({n_ref})")
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  if q_block <= 0 or r_block <= 0:
    raise ValueError(f"block sizes must be positive, got q_block={q_block}, r_block={r_block}")
  # Each device holds n_sub sub-blocks of q_sub <= q_block rows, balanced so that little
  # padding is computed.
  q_sub = balanced_block(-(-nq // n_dev), q_block, 8 if q_block % 8 == 0 else 1)
  per_dev = -(-nq // (n_dev * q_sub)) * q_sub
  nq_pad = per_dev * n_dev
  q_pad = np.zeros((nq_pad, d), np.float32)
  q_pad[:nq] = q
  data_sh = parallel.data_sharded(mesh)
  rep_sh = parallel.replicated(mesh)
  q_dev = jax.device_put(q_pad, data_sh)
  run_s = jax.device_put(np.full((nq_pad, k), _NEG_INF, np.float32), data_sh)
  run_i = jax.device_put(np.full((nq_pad, k), np.iinfo(np.int32).max, np.int32), data_sh)
  step = _step_fn(mesh, k, q_sub, int(chunk))
  if n_ref > np.iinfo(np.int32).max - r_block:
    raise ValueError(f"{ref_name}: {n_ref} rows exceed the int32 index range")

  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=nq * n_ref, unit="pair", unit_scale=True, desc="matching")
  offset = 0
  pending = None  # (result, pairs) of the previous step, to report progress one step late
  for block in ref_blocks:
    block = normalize(block, f"{ref_name} rows {offset}..", normalize_rows)
    m = len(block)
    if block.shape[1] != d:
      raise ValueError(f"{ref_name}: dimension {block.shape[1]} differs from the queries' {d}")
    if m > r_block:
      raise ValueError(f"{ref_name}: block of {m} rows exceeds r_block={r_block}")
    if m == 0:
      continue
    if m < r_block:
      # A fresh buffer: device_put may alias host memory on CPU while the step runs.
      padded = np.zeros((r_block, d), np.float32)
      padded[:m] = block
      block = padded
    r_dev = jax.device_put(block, rep_sh)
    run_s, run_i = step(q_dev, run_s, run_i, r_dev, np.int32(m), np.int32(offset))
    offset += m
    if pending is not None:
      jax.block_until_ready(pending[0])
      if bar is not None:
        bar.update(pending[1])
    pending = (run_s, nq * m)
  if offset != n_ref:
    raise ValueError(f"{ref_name}: streamed {offset} rows, expected {n_ref}")
  scores, idx = jax.device_get((run_s, run_i))
  if bar is not None:
    bar.update(pending[1])
    bar.close()
  return np.asarray(scores[:nq], np.float32), np.asarray(idx[:nq], np.int64)


def balanced_block(n: int, max_block: int, multiple: int) -> int:
  """The smallest block (a multiple of `multiple`, <= max_block when max_block is one) that
  covers n rows in as few blocks as max_block does: 60,000 rows by <= 8,192 gives 8 blocks
  of 7,552 (0.7% padding) instead of 8,192 (9%)."""
  n_blocks = max(1, -(-n // max_block))
  return -(-(-(-n // n_blocks)) // multiple) * multiple


def ref_block_size(n_ref: int, r_block: int, chunk: int) -> int:
  """The reference block topk_match and match_stores use: balanced, <= r_block, and a
  multiple of the chunk (the prefilter needs it) when r_block is one."""
  mult = chunk if chunk and r_block % chunk == 0 else 1
  return balanced_block(n_ref, r_block, mult)


def _array_blocks(x: np.ndarray, rows: int) -> Iterator[np.ndarray]:
  for start in range(0, len(x), rows):
    yield x[start:start + rows]


def topk_match(query_emb: np.ndarray, ref_emb: np.ndarray, k: int, q_block: int = 256,
               r_block: int = 8192, mesh: Optional[Mesh] = None, chunk: int = 64,
               normalize_rows: bool = True,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Exact cosine top-k for in-memory arrays (see topk_match_blocks for the arguments).

  Returns:
    scores (Nq, k) float32 descending; indices (Nq, k) int64 rows of ref_emb.
  """
  ref_emb = np.asarray(ref_emb)
  if ref_emb.ndim != 2:
    raise ValueError(f"reference: need a (n, d) array, got shape {ref_emb.shape}")
  r_block = ref_block_size(len(ref_emb), r_block, chunk)
  return topk_match_blocks(query_emb, _array_blocks(ref_emb, r_block), len(ref_emb), k,
                           q_block=q_block, r_block=r_block, mesh=mesh, chunk=chunk,
                           normalize_rows=normalize_rows, progress=progress)


def match_stores(query_folder: str, ref_folder: str, out_path: str, k: int,
                 q_block: int = 256, r_block: int = 8192, mesh: Optional[Mesh] = None,
                 chunk: int = 64, normalize_rows: bool = True,
                 progress: bool = True, query_ids: Optional[Sequence[str]] = None,
                 ref_ids: Optional[Sequence[str]] = None) -> dict:
  """Matches a query store (synthetic) against a reference store (training), streaming.

  The query store is loaded (it is the (Nq, d) side kept on the devices); the reference
  store is read once, one block at a time. Both must be complete: a store marked complete
  with fewer or more rows than its source is refused (store.read_index), naming the folder
  and the counts.

  Args:
    query_folder: store of synthetic embeddings.
    ref_folder: store of training embeddings.
    out_path: results file, written atomically. `.npz`: arrays synth_ids (Nq,),
      train_ids (Nq, k), indices (Nq, k) int64, scores (Nq, k) float32. Otherwise a CSV
      with columns synth_id, rank (1 = closest), train_id, score.
    k, q_block, r_block, mesh, chunk, normalize_rows, progress: see topk_match_blocks.
    query_ids, ref_ids: the ids of the image sets the stores are taken for, in order
      (jobs.match_job passes them): each store's rows must be exactly these, else
      InputError naming the folder and the counts.

  Returns:
    {"path", "n_query", "n_ref", "k"}.
  """
  q_ids, q_emb = store.load_store(query_folder, source_ids=query_ids)
  ref_index = store.read_index(ref_folder, source_ids=ref_ids)
  if q_emb.shape[1] != ref_index["dim"]:
    raise fileio.InputError(f"{ref_folder}: embedding dimension {ref_index['dim']} differs from "
                        f"{q_emb.shape[1]} in {query_folder}")
  n_ref = ref_index["n_rows"]
  r_block = ref_block_size(n_ref, r_block, chunk)
  ref_ids_read = []

  def blocks():
    for ids, emb in store.iter_store_blocks(ref_folder, r_block, ref_index):
      ref_ids_read.append(ids)
      yield emb

  scores, idx = topk_match_blocks(q_emb, blocks(), n_ref, k, q_block=q_block,
                                  r_block=r_block, mesh=mesh, chunk=chunk,
                                  normalize_rows=normalize_rows, progress=progress,
                                  ref_name=ref_folder)
  streamed_ids = np.concatenate(ref_ids_read)
  if ref_ids is not None:
    store.check_rows(ref_folder, streamed_ids, ref_ids)
  train_ids = streamed_ids[idx]
  if str(out_path).endswith(".npz"):
    fileio.write_npz(out_path, synth_ids=q_ids, train_ids=train_ids, indices=idx, scores=scores)
  else:
    fileio.write_csv(out_path, ["synth_id", "rank", "train_id", "score"],
                 ((q_ids[a], b + 1, train_ids[a, b], scores[a, b])
                  for a in range(len(q_ids)) for b in range(k)))
  return {"path": out_path, "n_query": int(len(q_ids)), "n_ref": int(n_ref), "k": int(k)}
