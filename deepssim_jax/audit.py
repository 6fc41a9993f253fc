"""The memorization audit: from a training set and a synthetic set to per-sample verdicts.

"Did my generative model copy patients, which samples, how many, how sure are we?" One job
embeds the training, synthetic and (optionally) held-out real images, finds every synthetic
image's k nearest training images, classes it under the paper's thresholds, adds the
calibrated verdicts of deepssim_jax.calibrate (Dar et al., the Memorization Index, Carlini
et al.) and writes one output folder:

  audit.csv     one row per synthetic image (in embedding order): synth_id, the nearest
                training id and score, the next k-1 (train_id_2, score_2, ...), class
                (0 Different, 1 Duplicate, 2 Similar) and class_name under the paper's
                thresholds, then the calibrated columns (dar_memorized, mi_score, mi, oni,
                mi_memorized, carlini_ratio, carlini_memorized; those switched on).
  summary.json  counts per class, memorization rate (share of synthetic images classed
                Duplicate), share of training images copied at least once (training images
                that are the nearest match of at least one Duplicate) and of subjects
                (audit.subject_regex: the volume of a slice id by default), thresholds,
                calibration summaries, fingerprints of the checkpoint, data and settings;
                with known answers (audit.truth: a CSV, or the demo's labels;
                deepssim_jax.truth), the precision / recall of every decision rule
                ("validation").
  report.html   deepssim_jax.report: summary, histogram, gallery of the closest pairs
                (with the checkpoint's explanation maps of each pair when the job is
                given the model and explain.in_report is on: deepssim_jax.explain).

Nothing is written until every number and the whole report are computed; the three files
are then written into a fresh temporary folder beside the output folder, which replaces the
old one by rename (`publish`, fileio.replace_folder). A failed audit leaves the previous
output (or none) untouched, never a half-written report.

Embeddings come from a function `embeddings(config, workdir, spec, name) -> (ids, emb)`
(spec = config.data.<name>); the jobs module plugs in the store-backed embedding job. The
images are only needed for the gallery, the image-size check and Carlini in pixel space,
so they are read lazily from `images(config, workdir, spec, name) -> source` (an object
with `keys`, `len` and `source[i] -> (H, W)` image, like deepssim_jax.data's sources): by
default the demo bank cached in <workdir>/data, or banks.open_source for real sets. An
audit of 10^6 synthetic images holds their embeddings, not their pixels.

Comparing several audits is deepssim_jax.compare.
"""

import functools
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import (align, calibrate, embed, evaluate, explain, fileio, match, parallel,
                          report, truth as truth_lib)

Embeddings = Callable[[ml_collections.ConfigDict, str, Any, str], tuple[np.ndarray, np.ndarray]]
Images = Callable[[ml_collections.ConfigDict, str, Any, str], Any]
# (config, workdir) -> (DeepSSIM module, variables): the checkpoint's model, for the maps.
Model = Callable[[ml_collections.ConfigDict, str], tuple[Any, Any]]

FILES = ("audit.csv", "summary.json", "report.html")


# An in-memory (keys, (n, H, W) images) pair seen as an image source.
ArraySource = embed.BankSource


def default_images(config: ml_collections.ConfigDict, workdir: str, spec, name: str):
  """The images of config.data.<name> as a random-access source, read lazily.

  Demo sets are generated banks, cached in <workdir>/data/<name>.npz as the other jobs do;
  every other kind is banks.open_source (nothing read until an image is asked for).
  """
  from deepssim_jax import banks  # pylint: disable=g-import-not-at-top
  if spec.kind == "demo":
    b = banks.bank(spec, config, os.path.join(workdir, "data"), name)
    return ArraySource(b["keys"], b["images"])
  return banks.open_source(spec, config.data.image_size, config.data.get("download_hint", ""))


def _spec(config, name: str):
  spec = config.data.get(name) if name else None
  return spec if spec is not None and spec.get("kind") else None


# ---------------------------------------------------------------------------------------
# Pure pieces.

def aligns(config: ml_collections.ConfigDict) -> bool:
  """Whether the audit scores after rigid registration: audit.align, or a model meant to be
  scored so (model.align)."""
  return bool(config.audit.get("align", False) or config.get("model", {}).get("align", False))


def check_sets(sets: Mapping[str, Mapping[str, Any]]) -> None:
  """Validates the loaded sets: non-empty, one embedding per id, same image size and
  embedding dimension everywhere.

  Args:
    sets: {role: {"ids", "emb", "shape" (H, W of its images), "name"}}, role training /
      synthetic / heldout.

  Raises:
    InputError naming the set and the problem.
  """
  ref = sets["training"]
  for role, s in sets.items():
    what = f"{role} set ({s['name']})"
    if not len(s["ids"]) or not len(s["emb"]):
      raise fileio.InputError(f"{what} is empty")
    if np.asarray(s["emb"]).ndim != 2 or len(s["emb"]) != len(s["ids"]):
      raise fileio.InputError(f"{what}: {len(s['ids'])} ids but embeddings of shape "
                          f"{np.shape(s['emb'])}")
    if np.shape(s["emb"])[1] != np.shape(ref["emb"])[1]:
      raise fileio.InputError(
          f"{what}: embedding dimension {np.shape(s['emb'])[1]} differs from the training "
          f"set's {np.shape(ref['emb'])[1]} (embedded with another checkpoint or model size?)")
    if tuple(s["shape"]) != tuple(ref["shape"]):
      raise fileio.InputError(f"mismatched image sizes: {what} has {tuple(s['shape'])}, the "
                          f"training set {tuple(ref['shape'])}")


def subjects(train_ids: Sequence[str], regex: str) -> np.ndarray:
  """The subject of each training id: `regex`'s first group, or the id where it does not
  match (so ids without a subject part are their own subject)."""
  pattern = re.compile(regex)
  out = []
  for i in np.asarray(train_ids, dtype=str).tolist():
    m = pattern.match(i)
    out.append(m.group(1) if m and m.groups() else i)
  return np.asarray(out, dtype=str)


def summarize(classes: np.ndarray, nearest_idx: np.ndarray, n_train: int,
              train_subjects: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Counts per class, memorization rate and share of training images copied at least once
  (the nearest match of a Duplicate); with the training images' subjects, also how many
  subjects (patients, volumes) have at least one image copied.

  Args:
    classes: (n,) paper classes of the synthetic images.
    nearest_idx: (n,) index of each one's nearest training image.
    n_train: training set size.
    train_subjects: (n_train,) subject of each training image, or None.
  """
  classes = np.asarray(classes)
  dup = classes == 1
  copied = np.unique(np.asarray(nearest_idx)[dup])
  out = {"counts": {evaluate.CLASS_NAMES[c]: int(np.sum(classes == c)) for c in (1, 2, 0)},
         "memorization_rate": float(dup.mean()) if len(classes) else 0.0,
         "n_training_copied": int(len(copied)),
         "share_training_copied": float(len(copied) / n_train) if n_train else 0.0}
  if train_subjects is not None:
    subj = np.asarray(train_subjects, dtype=str)
    n_subj = len(np.unique(subj))
    hit = np.unique(subj[copied]) if len(copied) else np.zeros(0, str)
    out.update(n_subjects=n_subj, n_subjects_copied=int(len(hit)),
               share_subjects_copied=float(len(hit) / n_subj) if n_subj else 0.0)
  return out


def audit_columns(k: int, columns: Sequence[str]) -> list[str]:
  """The audit.csv header."""
  header = ["synth_id"]
  for j in range(k):
    header += [f"train_id_{j + 1}", f"score_{j + 1}"]
  return header + ["class", "class_name"] + list(columns)


def audit_rows(synth_ids, train_ids, scores, idx, classes,
               columns: Mapping[str, np.ndarray]) -> Iterator[list]:
  """The audit.csv rows, one per synthetic image, generated (see the module docstring)."""
  train_ids = np.asarray(train_ids)
  cols = [(np.asarray(v), np.issubdtype(np.asarray(v).dtype, np.integer))
          for v in columns.values()]
  for i, sid in enumerate(synth_ids):
    row = [str(sid)]
    for j in range(scores.shape[1]):
      row += [str(train_ids[idx[i, j]]), float(scores[i, j])]
    row += [int(classes[i]), evaluate.CLASS_NAMES[int(classes[i])]]
    row += [int(v[i]) if is_int else float(v[i]) for v, is_int in cols]
    yield row


def publish(out_dir: str, files: Mapping[str, Any]) -> str:
  """Writes an audit's files as one folder, all or nothing (fileio.replace_folder): out_dir
  must be absent, empty, or a previous output (it holds summary.json). Returns out_dir."""
  return fileio.replace_folder(out_dir, files, marker="summary.json")


# ---------------------------------------------------------------------------------------
# The job.

def _load(config, workdir, role: str, name: str, embeddings: Embeddings, images: Images,
          embedding_fingerprint: Optional[Callable[[Any, str, str], str]] = None):
  spec = _spec(config, name)
  if spec is None:
    raise fileio.InputError(f"config.data.{name or '<unset>'}: no {role} image set configured")
  src = images(config, workdir, spec, name)
  ids, emb = embeddings(config, workdir, spec, name)
  ids = np.asarray(ids, dtype=str)
  emb = np.asarray(emb)
  keys = np.asarray(src.keys, dtype=str)
  if not len(ids) or not len(keys):
    raise fileio.InputError(f"{role} set (config.data.{name}) is empty")
  if len(ids) != len(emb):
    raise fileio.InputError(f"{role} set ({name}): {len(ids)} ids but {len(emb)} embeddings")
  pos = fileio.key_rows(keys, ids, f"{role} images ({name})")
  shape = tuple(np.shape(src[int(pos[0])]))
  # Data: which images (the set's spec, ids and size); embeddings: what the model made of
  # them. With embedding_fingerprint (the store's: inputs and settings, the checkpoint's
  # weights) it is the same for any batch size or device count; without it, a hash of the
  # float embeddings. Neither reads every image again.
  emb_fp = (embedding_fingerprint(config, workdir, name) if embedding_fingerprint
            else fileio.fingerprint(np.ascontiguousarray(emb)))
  return {"name": name, "ids": ids, "emb": emb, "source": src, "rows": pos, "shape": shape,
          "fingerprint": fileio.fingerprint(json.dumps(spec.to_dict(), sort_keys=True,
                                                   default=str), ids, str(shape)),
          "emb_fingerprint": emb_fp}


def compute_audit(config: ml_collections.ConfigDict, sets: Mapping[str, Mapping[str, Any]],
                  checkpoint_fingerprint: str = "",
                  truth: Optional[Mapping[str, np.ndarray]] = None,
                  explainer: Optional[Callable[[np.ndarray, np.ndarray], Mapping]] = None,
                  embed_images: Optional[Callable[[np.ndarray], np.ndarray]] = None
                  ) -> dict[str, Any]:
  """Everything an audit writes, computed in memory (no file is touched).

  Args:
    config: with the audit, calibrate and report sections.
    sets: {"training", "synthetic"[, "heldout"]}: each {"name", "ids", "emb", "source"
      (random-access images), "rows" (source row of each id), "shape" (H, W),
      "fingerprint", "emb_fingerprint"}.
    checkpoint_fingerprint: recorded in the summary.
    truth: known answers in synthetic-id order (truth.read_truth / truth.load_truth), or
      None; with them the summary gets "validation" (truth.validate) and the report its
      table.
    explainer: (synthetic images, training images) of the gallery pairs -> {score: (maps,
      maps)} (make_explainer), or None: no explanation maps in the report.
    embed_images: (K, H, W) z-scored images -> (K, D) unit embeddings with the network that
      made the sets' embeddings (make_embedder); needed by audit.align (or a model whose
      config.model.align is set), which embeds the rigid candidates of the training images
      it re-scores.

  Returns:
    {"files": {file name: text or a writer (see publish)}, "summary": dict, "classes",
    "scores", "indices", "columns"}.
  """
  check_sets(sets)
  ac = config.audit
  t_low, t_high = (float(t) for t in ac.thresholds)
  tr, sy = sets["training"], sets["synthetic"]
  held = sets.get("heldout")
  n_train = len(tr["ids"])
  k = min(int(ac.k), n_train)
  if k < 1:
    raise ValueError(f"audit.k must be >= 1, got {ac.k}")
  mkw = {key: int(v) for key, v in dict(config.calibrate.get("match", {})).items()}
  aligned = aligns(config)
  if aligned and embed_images is None:
    raise ValueError("audit.align needs the network (compute_audit's embed_images) to embed "
                     "the aligned training images")
  if aligned and int(ac.align_rerank) < 1:
    raise ValueError(f"audit.align_rerank must be >= 1, got {ac.align_rerank}")

  def nearest(query, ref, n):  # (scores, indices) of each query row's n best, as configured
    if not aligned:
      return match.topk_match(query["emb"], ref["emb"], n, **mkw)
    # As many candidates for every query set (a held-out image's nearest is searched as
    # widely as a synthetic image's), over the query's flip states (align.flip_candidates).
    m = min(len(ref["ids"]), k * int(ac.align_rerank))
    rows = _Rows(query["source"], query["rows"])
    progress = parallel.is_main_process()
    cand = align.flip_candidates(
        embed_images, rows, query["emb"], ref["emb"], m,
        lambda q, r, n: match.topk_match(q, r, n, **mkw), chunk=int(ac.align_chunk),
        progress=progress, desc=f"candidates {query['name']}")
    return align.rerank(embed_images, rows, _Rows(ref["source"], ref["rows"]), cand, n,
                        chunk=int(ac.align_chunk), progress=progress,
                        desc=f"align {query['name']}")

  scores, idx = nearest(sy, tr, k)
  nn = scores[:, 0].astype(np.float64)
  heldout_nn = None
  if aligned and held is not None and "dar" in calibrate.enabled(config.calibrate):
    query, ref = (sets[r] for r in calibrate.dar_direction(config.calibrate.dar))
    heldout_nn = nearest(query, ref, 1)[0][:, 0]
  classes = evaluate.classify(nn, t_low, t_high)

  stack = lambda s: np.stack([s["source"][int(r)] for r in s["rows"]])  # noqa: E731
  need_pixels = (config.calibrate.carlini.enabled
                 and config.calibrate.carlini.space == "pixels")
  ctx = calibrate.context(
      tr["emb"], sy["emb"], heldout_emb=None if held is None else held["emb"], synth_nn=nn,
      train_images=stack(tr) if need_pixels else None,
      synth_images=stack(sy) if need_pixels else None, match_kw=mkw, heldout_nn=heldout_nn,
      aligned=aligned)
  cal = calibrate.run_all(config.calibrate, ctx)

  summary = {
      "name": str(ac.get("name", "")) or sy["name"],
      "n_synthetic": int(len(sy["ids"])), "n_training": n_train,
      "n_heldout": int(len(held["ids"])) if held is not None else 0, "k": k,
      **summarize(classes, idx[:, 0], n_train,
                  subjects(tr["ids"], ac.subject_regex)),
      "thresholds": {"t_low": t_low, "t_high": t_high,
                     **({"dar": cal["summary"]["dar"]["threshold"]}
                        if "dar" in cal["summary"] else {})},
      "nearest_score": {"mean": float(nn.mean()), "median": float(np.median(nn)),
                        "max": float(nn.max()), "min": float(nn.min())},
      "calibration": cal["summary"],
      "align": ({"rerank": int(ac.align_rerank), "max_angle_deg": float(np.rad2deg(
          align.MAX_ANGLE)), "angle_step_deg": float(np.rad2deg(align.ANGLE_STEP)),
                 "flips": True} if aligned else None),
      "fingerprints": {
          "checkpoint": checkpoint_fingerprint,
          **{role: s["fingerprint"] for role, s in sets.items()},
          **{f"{role}_embeddings": s["emb_fingerprint"] for role, s in sets.items()},
          # What decides the numbers (not where they are written or the run's name).
          "settings": fileio.fingerprint(json.dumps(
              {"audit": {k: v for k, v in ac.to_dict().items() if k not in ("out_dir", "name")},
               "calibrate": config.calibrate.to_dict()}, sort_keys=True, default=str))},
      "files": list(FILES),
  }
  if truth is not None:
    summary["validation"] = truth_lib.validate(
        truth, truth_lib.rule_decisions(classes, cal["columns"]), nn, tr["ids"][idx[:, 0]])
  header = audit_columns(k, cal["columns"])

  def write_audit_csv(path):  # streamed row by row: 10^6 rows never sit in memory as text
    fileio.write_csv(path, header, audit_rows(sy["ids"], tr["ids"], scores, idx, classes,
                                          cal["columns"]))

  lines = {"t_low": t_low, "t_high": t_high}
  if "dar" in cal["summary"]:
    lines["Dar et al."] = cal["summary"]["dar"]["threshold"]
  extra = {"2nd score": scores[:, 1]} if k > 1 else {}
  extra.update({c: v for c, v in cal["columns"].items() if c in ("mi", "oni", "carlini_ratio",
                                                                  "dar_memorized")})
  # Gallery images are gathered lazily: only the rows the report shows are read.
  html_text = report.build_report(
      summary, nn, classes, sy["ids"], tr["ids"][idx[:, 0]],
      _Rows(sy["source"], sy["rows"]), _Rows(tr["source"], tr["rows"][idx[:, 0]]),
      lines, config.report, extra=extra,
      notes=[f"{summary['n_synthetic']} synthetic images audited against "
             f"{n_train} training images; classes under the paper's thresholds "
             f"(score <= {t_low:g} Different, > {t_high:g} Duplicate, else Similar)"
             + (", each score after the training image was rigidly aligned onto the "
                "synthetic one (flips, rotations up to 9 degrees)" if aligned else "") + ". "
             "The difference image is |synthetic - training| of the z-scored images."],
      explainer=explainer,
      map_how=explain.describe(config.explain) if explainer is not None else "")
  files = {"audit.csv": write_audit_csv,
           "summary.json": json.dumps(fileio.json_ready(summary), indent=2,
                                      sort_keys=True) + "\n",
           "report.html": html_text}
  return {"files": files, "summary": summary, "classes": classes, "scores": scores,
          "indices": idx, "columns": cal["columns"]}


def make_explainer(config: ml_collections.ConfigDict, workdir: str,
                   model: Optional[Model]) -> Optional[Callable]:
  """The report's explanation-map function (explain.explain_pairs with the checkpoint's
  model and config.explain), or None when explain.in_report is off or no model is given."""
  cfg = config.get("explain")
  if model is None or cfg is None or not cfg.in_report or not tuple(cfg.scores):
    return None
  module, variables = model(config, workdir)
  return functools.partial(explain.explain_pairs, module, variables, cfg=cfg)


def make_embedder(config: ml_collections.ConfigDict, workdir: str,
                  model: Optional[Model]) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  """The checkpoint network's embedding of z-scored image stacks (embed.embed_array at
  config.embed.batch_size), which audit.align needs; None when audit.align is off."""
  if not aligns(config):
    return None
  if model is None:
    raise ValueError("audit.align needs the checkpoint's model to embed aligned images")
  module, variables = model(config, workdir)
  return functools.partial(embed.embed_array, module, variables,
                           batch_size=int(config.embed.batch_size), progress=False,
                           embed_fn=embed.make_embed_fn(module))


class _Rows:
  """source[rows[i]] on demand (len and integer indexing only)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return np.asarray(self.source[int(self.rows[i])])


def audit_job(config: ml_collections.ConfigDict, workdir: str,
              embeddings: Optional[Embeddings] = None, images: Optional[Images] = None,
              checkpoint_fingerprint: Optional[Callable[[Any, str], str]] = None,
              embedding_fingerprint: Optional[Callable[[Any, str, str], str]] = None,
              model: Optional[Model] = None) -> dict[str, Any]:
  """Audits config.data.<audit.synthetic> against config.data.<audit.training>.

  Args:
    config: a base config (config_lib.base_config, audit sections included).
    workdir: the run folder; output goes to config.audit.out_dir or <workdir>/audit.
    embeddings: (config, workdir, spec, name) -> (ids (n,), emb (n, d)); required.
    images: (config, workdir, spec, name) -> random-access image source (keys, len,
      [i] -> (H, W)); default default_images.
    checkpoint_fingerprint: (config, workdir) -> str recorded in summary.json; default
      none recorded ('').
    embedding_fingerprint: (config, workdir, set name) -> the set's embedding fingerprint
      (the store's, of inputs and settings); default a hash of the float embeddings.
    model: (config, workdir) -> (DeepSSIM module, variables) of the checkpoint that made
      the embeddings; with it (and explain.in_report) the report shows each gallery pair's
      explanation maps. Default none: no maps.

  Returns:
    {"out_dir", "summary"}.

  Raises:
    InputError: a set is missing or empty, sizes or dimensions disagree, Dar et al. is on
      without a held-out set, ... ; nothing is written then.
  """
  if embeddings is None:
    raise ValueError("audit_job needs an embeddings function (config, workdir, spec, name) "
                     "-> (ids, emb); jobs passes the store-backed one")
  images = images or default_images
  ac = config.audit
  load = functools.partial(_load, config, workdir, embeddings=embeddings, images=images,
                           embedding_fingerprint=embedding_fingerprint)
  sets = {"training": load("training", ac.training), "synthetic": load("synthetic", ac.synthetic)}
  if ac.heldout and _spec(config, ac.heldout) is not None:
    sets["heldout"] = load("held-out", ac.heldout)
  elif config.calibrate.dar.enabled:
    raise fileio.InputError(
        f"Dar et al. calibration needs a held-out real image set: configure "
        f"config.data.{ac.heldout or 'heldout'} (and audit.heldout), or set "
        "calibrate.dar.enabled = False")
  ck = checkpoint_fingerprint(config, workdir) if checkpoint_fingerprint else ""
  truth = truth_lib.load_truth(config, workdir, sets["synthetic"]["ids"])
  out = compute_audit(config, sets, ck, truth, make_explainer(config, workdir, model),
                      make_embedder(config, workdir, model))
  out_dir = ac.out_dir or os.path.join(workdir, "audit")
  if parallel.is_main_process():  # every process computed the same audit; one writes it
    out_dir = publish(out_dir, out["files"])
  parallel.sync("audit published: " + out_dir)
  s = out["summary"]
  logging.info("Audit %s: %d synthetic images, %.1f%% Duplicate, %.1f%% of training images "
               "copied; written to %s", s["name"], s["n_synthetic"],
               100 * s["memorization_rate"], 100 * s["share_training_copied"], out_dir)
  return {"out_dir": out_dir, "summary": s}
