"""Calibrated memorization verdicts on top of the nearest-training-image scores.

DeepSSIM's fixed thresholds (evaluate.PAPER_THRESHOLDS) say how SSIM-like a pair is, not how
unusual that is for the training set at hand: a set of near-identical slices has high
nearest-neighbour scores even between distinct patients. Three published criteria
calibrate the verdict (Dar et al., the Memorization Index of Deo et al., Carlini et al.);
each is a function here, chosen by name and switched on in the config:

* dar (Dar et al. 2024): threshold = the `percentile`-th percentile (95, numpy's linear
  interpolation) of the nearest-training-neighbour similarities of a held-out real set
  (direction 'train_to_heldout': of every training image's nearest held-out image
  instead, as the reference computes it); a synthetic image whose nearest-training
  similarity is above it is memorized (the reference: Duplicate > t). Needs the held-out set.
* mi (Memorization Index, Deo et al. 2026): a null distribution of nearest-neighbour
  similarities between real images that are NOT copies: the training set is split into
  random halves A and B (`rounds` rounds, seeded) and every image of A is matched to its
  nearest image of B. With mu_null and sigma_null the mean and standard deviation of the
  pooled null, MI = (s - mu_null) / sigma_null and ONI = -tanh(MI) for every synthetic image
  with nearest-training similarity s. Optionally the embeddings are ZCA-whitened first
  (fitted on the training set, epsilon from the config) and re-normalised. Deo et al.
  pool several layers of a feature network; DeepSSIM has one embedding, which is used.
  s is taken over the whole training set (as Deo et al. define it), while the null's
  reference is a half, and
  the nearest of n/2 images is on average less similar than the nearest of n: the null sits
  a little low, so MI leans towards flagging. `synthetic_reference = 'halves'` removes
  that bias: s becomes the mean over the rounds of the nearest similarity within half B.
* carlini (Carlini et al. 2023): relative L2 distance
  r = d_1 / (alpha * mean(d_1, ..., d_n)), d_i the distance of a synthetic image to its
  i-th nearest training image (the mean runs over the n nearest, the nearest included, as
  in the paper's E over S_x); memorized if r < delta. alpha 0.5, n 50; delta 1 is the
  plain reading "d_1 < alpha x the mean distance of the n nearest". Distances are L2 between
  unit embeddings (sqrt(2 - 2 cos), space 'embedding', the default: alignment-robust and as
  scalable as the matching) or between the z-scored images (space 'pixels', the paper's
  pixel L2; exact, O(N x M x H x W), for small sets). This is the criterion's one
  implementation (relative_distance, float64): the evaluation metric carlini_l2
  (deepssim_jax.metrics) calls it too.

Every calibration is `fn(cfg, ctx) -> {"columns": {name: (n_synth,) array},
"summary": {...}}`, cfg its config section, ctx a dict of arrays (see `context`).
It is longer than ~400 lines because it holds the three criteria with the
formulas, nearest-neighbour searches and whitening they share; split, each piece would be
imported by all three.
"""

from typing import Any, Callable, Mapping, Optional

import ml_collections
import numpy as np

from deepssim_jax import fileio, match


def default_config() -> ml_collections.ConfigDict:
  """The `calibrate` config section (an audit config holds it as config.calibrate)."""
  c = ml_collections.ConfigDict()
  c.dar = ml_collections.ConfigDict()
  c.dar.enabled = True
  c.dar.percentile = 95.0       # of held-out-to-training nearest-neighbour similarities
  # heldout_to_train: each held-out image's nearest training image (the wording);
  # train_to_heldout: each training image's nearest held-out image (the reference's).
  c.dar.direction = "heldout_to_train"

  c.mi = ml_collections.ConfigDict()
  c.mi.enabled = True
  c.mi.rounds = 10              # random half splits of the training set
  c.mi.seed = 42
  c.mi.whiten = False           # ZCA-whiten the embeddings (fitted on training) first
  c.mi.zca_eps = 1e-3           # added to the covariance eigenvalues before 1/sqrt
  c.mi.ddof = 0                 # sigma_null = std(null, ddof)
  c.mi.flag_z = 3.0             # our choice: "mi_memorized" = MI > flag_z (not in the paper)
  c.mi.synthetic_reference = "full"  # s against the full training set, or 'halves' (B halves)

  c.carlini = ml_collections.ConfigDict()
  c.carlini.enabled = True
  c.carlini.alpha = 0.5
  c.carlini.n = 50              # nearest training images in the mean (capped at n_train)
  c.carlini.delta = 1.0         # memorized if d_1 / (alpha * mean_n d) < delta
  c.carlini.space = "embedding"  # 'embedding' (unit-embedding L2) or 'pixels'
  c.carlini.pixel_block = 64    # synthetic images per block of the pixel-space search

  c.match = ml_collections.ConfigDict()  # topk_match settings of every search here
  c.match.q_block = 256
  c.match.r_block = 8192
  c.match.chunk = 64
  return c


# ---------------------------------------------------------------------------------------
# Checks and nearest neighbours.

def check_embeddings(x, name: str, dim: Optional[int] = None) -> np.ndarray:
  """A non-empty, finite (n, d) float32 array, with d == dim when given.

  Raises:
    InputError naming `name` and the problem.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise fileio.InputError(f"{name}: need a (n, d) embedding array, got shape {x.shape}")
  if len(x) == 0:
    raise fileio.InputError(f"{name}: empty set (no embeddings)")
  if dim is not None and x.shape[1] != dim:
    raise fileio.InputError(f"{name}: embedding dimension {x.shape[1]} differs from the training "
                        f"set's {dim}")
  x = x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(x)):
    raise fileio.InputError(f"{name}: embeddings contain NaN or infinity")
  return x


def _match_kw(cfg_match) -> dict:
  cfg_match = cfg_match or {}
  return {k: int(cfg_match[k]) for k in ("q_block", "r_block", "chunk") if k in cfg_match}


def nearest(query: np.ndarray, ref: np.ndarray, k: int = 1,
            match_kw: Optional[Mapping] = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact cosine top-k of every query row among ref rows (match.topk_match).

  Returns:
    scores (n, k) float32 descending, indices (n, k) int64.
  """
  return match.topk_match(query, ref, k, **dict(match_kw or {}))


# ---------------------------------------------------------------------------------------
# ZCA whitening.

def zca_fit(train_emb: np.ndarray, eps: float) -> dict[str, np.ndarray]:
  """ZCA whitening fitted on the training embeddings.

  W = U diag(1 / sqrt(lambda + eps)) U^T from the eigendecomposition U diag(lambda) U^T of
  the (1/n) covariance of the unit-normalised training rows, in float64.

  Returns:
    {"mean": (d,), "w": (d, d)} (both float64).
  """
  x = match.normalize(check_embeddings(train_emb, "training embeddings")).astype(np.float64)
  if eps < 0:
    raise ValueError(f"ZCA epsilon must be >= 0, got {eps}")
  mean = x.mean(axis=0)
  xc = x - mean
  cov = xc.T @ xc / len(x)
  lam, u = np.linalg.eigh(cov)
  lam = np.maximum(lam, 0.0)
  if eps == 0 and np.any(lam <= 1e-12 * max(lam.max(), 1e-300)):
    raise ValueError("ZCA: the training covariance is singular; use zca_eps > 0")
  w = (u / np.sqrt(lam + eps)) @ u.T
  return {"mean": mean, "w": w}


def zca_apply(zca: Mapping[str, np.ndarray], emb: np.ndarray, name: str = "embeddings",
              renormalize: bool = True) -> np.ndarray:
  """Whitens unit-normalised rows: (x - mean) W, then (by default) re-normalises them."""
  x = match.normalize(check_embeddings(emb, name, len(zca["mean"])), name).astype(np.float64)
  y = (x - zca["mean"]) @ zca["w"]
  return match.normalize(y, name + " (whitened)") if renormalize else y.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Formulas (pure numpy; the calibration functions below feed them).

def percentile_threshold(similarities: np.ndarray, percentile: float) -> float:
  """numpy's (linear-interpolation) percentile of the similarities."""
  s = np.asarray(similarities, np.float64)
  if not len(s):
    raise fileio.InputError("no similarities to take a percentile of (empty held-out set)")
  if not 0 <= percentile <= 100:
    raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
  return float(np.percentile(s, percentile))


def half_splits(n: int, rounds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """`rounds` random splits of range(n) into halves (A: n // 2 rows, B: the rest).

  The same (n, rounds, seed) always gives the same splits (numpy default_rng(seed)).
  """
  if n < 2:
    raise fileio.InputError(f"the Memorization Index null needs >= 2 training images, got {n}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(rounds):
    perm = rng.permutation(n)
    out.append((np.sort(perm[:n // 2]), np.sort(perm[n // 2:])))
  return out


def split_half_null(train_emb: np.ndarray, rounds: int, seed: int,
                    match_kw: Optional[Mapping] = None) -> np.ndarray:
  """Pooled null: for every split, the nearest-B cosine of every image of half A.

  Returns:
    (rounds * (n // 2),) float32, round by round, A rows in index order.
  """
  x = check_embeddings(train_emb, "training embeddings")
  out = []
  for a, b in half_splits(len(x), rounds, seed):
    s, _ = nearest(x[a], x[b], 1, match_kw)
    out.append(s[:, 0])
  return np.concatenate(out)


def mi_from_null(scores: np.ndarray, null: np.ndarray,
                 ddof: int = 0) -> tuple[np.ndarray, np.ndarray, float, float]:
  """MI = (s - mu_null) / sigma_null and ONI = -tanh(MI).

  Returns:
    (mi (n,) float64, oni (n,) float64, mu_null, sigma_null).

  Raises:
    ValueError: sigma_null is 0 (a degenerate null: e.g. a training set of identical images).
  """
  null = np.asarray(null, np.float64)
  if len(null) <= ddof:
    raise ValueError(f"the null has {len(null)} values; need more than ddof={ddof}")
  mu, sigma = float(null.mean()), float(null.std(ddof=ddof))
  if not sigma > 0:
    raise ValueError("the Memorization Index null has zero spread (sigma_null = 0): the "
                     "training images' nearest-neighbour similarities are all equal")
  mi = (np.asarray(scores, np.float64) - mu) / sigma
  return mi, -np.tanh(mi), mu, sigma


def unit_l2(cosine: np.ndarray) -> np.ndarray:
  """L2 distance between unit vectors from their cosine: sqrt(max(0, 2 - 2 cos))."""
  return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.asarray(cosine, np.float64)))


# Carlini et al.'s criterion has one implementation: relative_distance on distances from
# pixel_l2 / pixel_knn_l2 (or unit_l2 of embedding cosines). Both the audit's calibration
# (carlini below) and the evaluation metric metrics.carlini_l2 call it. Everything is float64
# on the host: the criterion compares a ratio of distances with delta = 1, and the distances
# that matter are the small ones of near copies, where squared distances expanded as
# |q|^2 + |t|^2 - 2 q.t lose their digits to cancellation (float32 leaves an absolute error
# of ~1e-7 |x|^2 in d^2: ~1e-3 for a z-scored 136 x 112 image). The expansion only finds the
# n nearest; their distances are then measured as direct differences, so an exact copy is
# exactly 0.

def relative_distance(dists: np.ndarray, alpha: float,
                      direct: Optional[np.ndarray] = None) -> np.ndarray:
  """Carlini et al.'s relative distance d / (alpha * mean_i d_i), in float64.

  Args:
    dists: (m, n) ascending distances of each synthetic image to its n nearest training
      images (the mean runs over all n, the nearest included).
    alpha: > 0 (0.5 in the paper).
    direct: (m,) distance of each synthetic image to the training image it is judged a copy
      of; default its nearest, dists[:, 0] (the audit's reading). The metric passes the
      distance to the image it is paired with.

  Returns:
    (m,) ratios (< delta: memorized). A zero direct distance gives 0 (an exact copy), even
    if all n are 0; the mean is floored at 1e-12, so the ratio stays finite.
  """
  d = np.asarray(dists, np.float64)
  if d.ndim != 2 or d.shape[1] < 1:
    raise ValueError(f"need (m, n >= 1) distances, got shape {d.shape}")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  top = d[:, 0] if direct is None else np.asarray(direct, np.float64).reshape(-1)
  if len(top) != len(d):
    raise ValueError(f"{len(top)} direct distances for {len(d)} rows of neighbours")
  return top / (alpha * np.maximum(d.mean(axis=1), 1e-12))


def pixel_l2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """L2 distance of each pair of images (m, H, W) x (m, H, W) -> (m,) float64, from their
  difference (no cancellation: an exact copy is 0)."""
  diff = (np.asarray(x, np.float64) - np.asarray(y, np.float64)).reshape(len(x), -1)
  return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def pixel_knn_l2(query_images: np.ndarray, ref_images: np.ndarray, n: int,
                 block: int = 64, ref_block: int = 4096) -> np.ndarray:
  """Exact L2 distances from every query image to its n nearest reference images.

  The n nearest are found blockwise (`block` query images against `ref_block` reference
  images at a time, float64 |q|^2 + |t|^2 - 2 q.t), so memory is bounded by the blocks;
  their distances are then measured by pixel_l2.

  Returns:
    (m, n) float64 ascending distances.
  """
  q = np.asarray(query_images)
  r = np.asarray(ref_images)
  if q.ndim != 3 or r.ndim != 3:
    raise fileio.InputError(f"pixel distances need (n, H, W) image stacks, got {q.shape} and "
                        f"{r.shape}")
  if not len(q) or not len(r):
    raise fileio.InputError("pixel distances: empty image set")
  if q.shape[1:] != r.shape[1:]:
    raise fileio.InputError(f"mismatched image sizes: synthetic {q.shape[1:]} vs training "
                        f"{r.shape[1:]}")
  n = min(n, len(r))
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)  # noqa: E731
  r2 = np.concatenate([np.einsum("ij,ij->i", t, t) for t in
                       (flat(r[s:s + ref_block]) for s in range(0, len(r), ref_block))])
  out = np.empty((len(q), n))
  for start in range(0, len(q), block):
    qb = q[start:start + block]
    qf = flat(qb)
    q2 = np.einsum("ij,ij->i", qf, qf)[:, None]
    best_d2 = np.zeros((len(qf), 0))
    best_idx = np.zeros((len(qf), 0), np.int64)
    for rs in range(0, len(r), ref_block):
      rb = flat(r[rs:rs + ref_block])
      d2 = np.concatenate([best_d2, q2 + r2[None, rs:rs + len(rb)] - 2.0 * qf @ rb.T], axis=1)
      idx = np.concatenate([best_idx, np.broadcast_to(np.arange(rs, rs + len(rb)),
                                                      (len(qf), len(rb)))], axis=1)
      if d2.shape[1] > n:  # keep the n nearest so far
        keep = np.argpartition(d2, n - 1, axis=1)[:, :n]
        d2, idx = np.take_along_axis(d2, keep, axis=1), np.take_along_axis(idx, keep, axis=1)
      best_d2, best_idx = d2, idx
    d = np.stack([pixel_l2(np.broadcast_to(qb[i], (n, *qb.shape[1:])), r[best_idx[i]])
                  for i in range(len(qb))])
    out[start:start + len(qb)] = np.sort(d, axis=1)
  return out


# ---------------------------------------------------------------------------------------
# Calibration functions: fn(cfg, ctx) -> {"columns": {...}, "summary": {...}}.

def context(train_emb, synth_emb, heldout_emb=None, synth_nn=None, train_images=None,
            synth_images=None, match_kw=None, heldout_nn=None, aligned=False
            ) -> dict[str, Any]:
  """Checks the inputs of the calibrations and bundles them.

  Args:
    train_emb: (n_train, d) training embeddings.
    synth_emb: (n_synth, d) synthetic embeddings.
    heldout_emb: (n_heldout, d) held-out real embeddings, or None (Dar needs them).
    synth_nn: (n_synth,) nearest-training cosine of every synthetic image, if already known
      (saves a search); computed when None.
    train_images, synth_images: (n, H, W) z-scored images (Carlini in pixel space only).
    match_kw: topk_match settings (q_block, r_block, chunk).
    heldout_nn: Dar et al.'s nearest similarities if already known (dar_direction's order),
      else None: computed from the embeddings.
    aligned: synth_nn (and heldout_nn) are scores after alignment (deepssim_jax.align), not
      embedding cosines: the embedding-space rules (MI) then search the embeddings
      themselves.
  """
  train = check_embeddings(train_emb, "training embeddings")
  d = train.shape[1]
  synth = check_embeddings(synth_emb, "synthetic embeddings", d)
  held = None if heldout_emb is None else check_embeddings(heldout_emb,
                                                           "held-out embeddings", d)
  kw = dict(match_kw or {})
  if synth_nn is None:
    synth_nn = nearest(synth, train, 1, kw)[0][:, 0]
  synth_nn = np.asarray(synth_nn, np.float64).reshape(-1)
  if len(synth_nn) != len(synth):
    raise ValueError(f"synth_nn has {len(synth_nn)} scores for {len(synth)} synthetic rows")
  if heldout_nn is not None:
    heldout_nn = np.asarray(heldout_nn, np.float64).reshape(-1)
  return {"train_emb": train, "synth_emb": synth, "heldout_emb": held, "synth_nn": synth_nn,
          "train_images": train_images, "synth_images": synth_images, "match_kw": kw,
          "heldout_nn": heldout_nn, "aligned": bool(aligned)}


# Dar et al.'s search directions: (query set, reference set) of the nearest neighbours.
DAR_DIRECTIONS = {"heldout_to_train": ("heldout", "training"),
                  "train_to_heldout": ("training", "heldout")}


def dar_direction(cfg) -> tuple[str, str]:
  """(query, reference) set names of a dar config section's direction."""
  direction = cfg.get("direction", "heldout_to_train")
  if direction not in DAR_DIRECTIONS:
    raise ValueError(f"dar.direction must be one of {sorted(DAR_DIRECTIONS)}, got "
                     f"{direction!r}")
  return DAR_DIRECTIONS[direction]


def dar(cfg, ctx) -> dict:
  """Dar et al.: percentile threshold of held-out-to-training nearest similarities (or the
  ctx's "heldout_nn", computed by the caller in dar_direction's order: aligned scores)."""
  held = ctx.get("heldout_emb")
  if held is None or not len(held):
    raise fileio.InputError("Dar et al. calibration needs a held-out real image set (none "
                        "given): provide one or set calibrate.dar.enabled = False")
  direction = cfg.get("direction", "heldout_to_train")
  query, ref = dar_direction(cfg)
  held_nn = ctx.get("heldout_nn")
  if held_nn is None:
    emb = {"heldout": held, "training": ctx["train_emb"]}
    held_nn = nearest(emb[query], emb[ref], 1, ctx.get("match_kw"))[0][:, 0]
  t = percentile_threshold(held_nn, float(cfg.percentile))
  flagged = ctx["synth_nn"] > t
  return {"columns": {"dar_memorized": flagged.astype(np.int64)},
          "summary": {"threshold": t, "percentile": float(cfg.percentile),
                      "direction": direction, "n_heldout": int(len(held)),
                      "heldout_nn_mean": float(np.mean(held_nn)),
                      "memorized": int(flagged.sum()),
                      "memorization_rate": float(flagged.mean())}}


def memorization_index(cfg, ctx) -> dict:
  """Deo et al.'s Memorization Index against a split-half null (optionally ZCA-whitened)."""
  train, synth = ctx["train_emb"], ctx["synth_emb"]
  kw = ctx.get("match_kw")
  if cfg.whiten:
    zca = zca_fit(train, float(cfg.zca_eps))
    train = zca_apply(zca, train, "training embeddings")
    synth = zca_apply(zca, synth, "synthetic embeddings")
  reference = cfg.get("synthetic_reference", "full")
  if reference == "full":
    s = (nearest(synth, train, 1, kw)[0][:, 0].astype(np.float64)
         if cfg.whiten or ctx.get("aligned") else ctx["synth_nn"])
  elif reference == "halves":
    s = np.mean([nearest(synth, train[b], 1, kw)[0][:, 0]
                 for _, b in half_splits(len(train), int(cfg.rounds), int(cfg.seed))],
                axis=0, dtype=np.float64)
  else:
    raise ValueError(f"mi.synthetic_reference must be 'full' or 'halves', got {reference!r}")
  null = split_half_null(train, int(cfg.rounds), int(cfg.seed), kw)
  mi, oni, mu, sigma = mi_from_null(s, null, int(cfg.ddof))
  flagged = mi > float(cfg.flag_z)
  return {"columns": {"mi_score": s, "mi": mi, "oni": oni,
                      "mi_memorized": flagged.astype(np.int64)},
          "summary": {"mu_null": mu, "sigma_null": sigma, "n_null": int(len(null)),
                      "mean_mi": float(np.mean(mi)), "max_mi": float(np.max(mi)),
                      "rounds": int(cfg.rounds), "seed": int(cfg.seed),
                      "synthetic_reference": str(reference),
                      "whiten": bool(cfg.whiten), "zca_eps": float(cfg.zca_eps),
                      "flag_z": float(cfg.flag_z), "memorized": int(flagged.sum()),
                      "memorization_rate": float(flagged.mean())}}


def carlini(cfg, ctx) -> dict:
  """Carlini et al.'s relative L2 distance (embedding or pixel space)."""
  n = min(int(cfg.n), len(ctx["train_emb"]))
  if n < 1:
    raise ValueError(f"carlini.n must be >= 1, got {cfg.n}")
  if cfg.space == "embedding":
    cos, _ = nearest(ctx["synth_emb"], ctx["train_emb"], n, ctx.get("match_kw"))
    d = unit_l2(cos)
  elif cfg.space == "pixels":
    if ctx.get("synth_images") is None or ctx.get("train_images") is None:
      raise fileio.InputError("carlini.space = 'pixels' needs the training and synthetic images")
    if len(ctx["synth_images"]) != len(ctx["synth_emb"]) or (
        len(ctx["train_images"]) != len(ctx["train_emb"])):
      raise ValueError("image and embedding counts differ")
    d = pixel_knn_l2(ctx["synth_images"], ctx["train_images"], n, int(cfg.pixel_block))
  else:
    raise ValueError(f"carlini.space must be 'embedding' or 'pixels', got {cfg.space!r}")
  r = relative_distance(d, float(cfg.alpha))
  flagged = r < float(cfg.delta)
  return {"columns": {"carlini_ratio": r, "carlini_memorized": flagged.astype(np.int64)},
          "summary": {"alpha": float(cfg.alpha), "n": int(cfg.n), "n_used": n,
                      "delta": float(cfg.delta), "space": str(cfg.space),
                      "memorized": int(flagged.sum()),
                      "memorization_rate": float(flagged.mean())}}


CALIBRATIONS: dict[str, Callable[[Any, Mapping], dict]] = {
    "dar": dar,
    "mi": memorization_index,
    "carlini": carlini,
}


def enabled(cfg) -> list[str]:
  """Names of the calibrations switched on in a `calibrate` config section, in order."""
  unknown = [k for k in cfg if k not in CALIBRATIONS and k != "match"]
  if unknown:
    raise ValueError(f"unknown calibration(s) {unknown}; known: {sorted(CALIBRATIONS)}")
  return [name for name in CALIBRATIONS if name in cfg and cfg[name].enabled]


def run_all(cfg, ctx) -> dict:
  """Runs every enabled calibration.

  Returns:
    {"columns": {column: (n_synth,) array} in registry order, "summary": {name: summary}}.
  """
  columns, summary = {}, {}
  for name in enabled(cfg):
    out = CALIBRATIONS[name](cfg[name], ctx)
    columns.update(out["columns"])
    summary[name] = out["summary"]
  return {"columns": columns, "summary": summary}
