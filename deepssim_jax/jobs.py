"""The config-driven jobs behind `python -m deepssim_jax.main`: data, pairs, train, evaluate.

Each job reads what earlier jobs left in the workdir (image banks, the pair table,
checkpoints) and builds what is missing, so the default mode runs end to end and any
interrupted step resumes:

  workdir/data/{real,synth}.npz   image banks (keys, z-scored images, meta)
  workdir/data/{real,synth}.npy   the same images, memory-mapped by the input pipeline
  workdir/pairs.csv               the pair table (real_key, synth_key, ssim, split)
  workdir/test_pairs.csv          labelled held-out pairs (demo; or config.data.test_pairs_csv)
  workdir/checkpoints/            orbax checkpoints (latest, best), config.json beside them
  workdir/eval/                   results.json, histograms, the printed table

It is longer than ~400 lines because it is the registry of every mode (MODES): each job is
short glue over the library modules, and they share the workdir's data and checkpoint
helpers; a module per job would scatter what a mode reads from and leaves in the workdir.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import (audit as audit_lib, augment, banks, compare as compare_lib, embed,
                          evaluate as eval_lib, fileio,
                          match as match_lib, metrics as metrics_lib, pairs as pairs_lib,
                          parallel, pipeline, ref_matrix, store, train)


def pair_record(config: ml_collections.ConfigDict, real_fp: str, synth_fp: str) -> dict:
  """What the workdir's pair table is made from: the pair settings that change its rows,
  the seed, the held-out share and the fingerprints of both banks (banks.bank). Settings
  that change nothing (pairs.batch_size) are left out."""
  pc = config.pairs
  rec = {"version": 1, "num_pairs": int(pc.num_pairs),
         "matched_fraction": float(pc.matched_fraction),
         "valid_fraction": float(pc.valid_fraction), "align": bool(pc.align),
         "balance_bins": int(pc.balance_bins), "seed": int(config.seed),
         "test_fraction": (0.0 if config.data.test_pairs_csv
                           else float(config.data.get("test_fraction", 0))),
         "real": real_fp, "synth": synth_fp}
  if pc.align:
    rec.update(align_angles=[float(a) for a in pc.align_angles],
               align_flips=bool(pc.align_flips))
  if pc.balance_bins:
    rec["pool_factor"] = float(pc.pool_factor)
    if pc.get("balance_repeat", False):
      rec["balance_repeat"] = True
  if pc.get("self_fraction", 0.0) and not config.data.synth.kind:
    rec["self_fraction"] = float(pc.self_fraction)
  return rec


def heldout_pairs_record(config: ml_collections.ConfigDict, real_fp: str, synth_fp: str
                         ) -> dict:
  """What the demo's labelled held-out pairs (test_pairs.csv) are made from."""
  return {"version": 1, "seed": int(config.seed),
          "test_fraction": float(config.data.test_fraction), "real": real_fp,
          "synth": synth_fp}


def refuse_stale_pair_table(table_path: str, diff: list, workdir: str) -> None:
  """A stale pair table under a trained run is refused (not rebuilt): it is the training
  data of the run's checkpoints, and resuming, evaluating or auditing them against another
  table would mix two runs in one workdir."""
  if not diff or diff == ["not built yet"] or not train.checkpoint_steps(workdir):
    return
  raise fileio.InputError(
      f"{table_path}: the pair table of this workdir does not match the config "
      f"({'; '.join(diff)}), and the checkpoints in {os.path.join(workdir, 'checkpoints')} "
      "were trained on it, so it is not rebuilt. Use a new --workdir for the new settings "
      f"(evaluate, embed and audit can read these checkpoints from there: "
      f"--config.eval.checkpoint={workdir}:best, --config.embed.checkpoint={workdir}:best), "
      "set the settings back, or, to keep using the table as it is, pass "
      f"--config.data.pairs_csv={table_path}")


def _cached_changes(path: str, record: dict) -> list:
  if not os.path.isfile(path):
    return ["not built yet"]
  return banks.changes(banks.read_record(path), record)


def prepare_data(config: ml_collections.ConfigDict, workdir: str, pair_table: bool = True
                 ) -> dict:
  """Image banks and the pair table, built once into the workdir and reused after.

  With pair_table=False (evaluation: it scores labelled test pairs only) the training pair
  table and the training arrays are neither checked, built nor read: "table",
  "table_path", "real_npy" and "synth_npy" are None.

  Each cached file (banks, pairs.csv, test_pairs.csv, the .npy copies) has a record of what
  it was made from beside it (<file>.record.json) and is reused only when the record
  matches the config; otherwise it is rebuilt and the log names what changed. The one
  exception: a stale pair table of a workdir holding checkpoints is refused before anything
  is written (refuse_stale_pair_table). A given data.pairs_csv is read, never written.
  """
  cache = os.path.join(workdir, "data")
  has_synth = bool(config.data.synth.kind)
  own_table = pair_table and not config.data.pairs_csv
  table_path = config.data.pairs_csv or os.path.join(workdir, "pairs.csv")
  if own_table:  # checked before any bank is rebuilt: a refused run writes nothing
    real_rec, _ = banks.cache_state(config.data.real, config, cache, "real")
    real_fp = banks.record_fingerprint(real_rec)
    synth_fp = (banks.record_fingerprint(banks.cache_state(config.data.synth, config, cache,
                                                           "synth")[0])
                if has_synth else real_fp)
    refuse_stale_pair_table(
        table_path, _cached_changes(table_path, pair_record(config, real_fp, synth_fp)),
        workdir)
  real = banks.bank(config.data.real, config, cache, "real", config.data.num_threads)
  synth = (banks.bank(config.data.synth, config, cache, "synth", config.data.num_threads)
           if has_synth else real)
  test_path = config.data.test_pairs_csv
  meta = synth.get("meta", {})
  train_synth = synth
  if not test_path and config.data.get("test_fraction", 0) and "label" in meta:
    # The demo knows each synthetic image's class: hold out a share of synthetic images
    # (never in the pair table) and label their pairs for the final evaluation.
    is_test = np.random.default_rng(config.seed + 1).random(len(synth["keys"])) < \
        config.data.test_fraction
    test_path = os.path.join(workdir, "test_pairs.csv")
    test_rec = heldout_pairs_record(config, real["fingerprint"], synth["fingerprint"])
    why = _cached_changes(test_path, test_rec)
    if why:
      if os.path.exists(test_path):
        logging.warning("%s: rebuilding the labelled test pairs: %s", test_path,
                        "; ".join(why))
      banks.drop_record(test_path)
      write_labelled_test_pairs(test_path, real, banks.subset(synth, is_test), config.seed)
      banks.write_record(test_path, test_rec)
    train_synth = banks.subset(synth, ~is_test)
  if not pair_table:
    return {"real": real, "synth": synth, "table": None, "table_path": None,
            "real_npy": None, "synth_npy": None, "test_pairs": test_path or None}
  if not own_table:
    if not os.path.exists(table_path):
      raise fileio.InputError(f"{table_path}: pair table not found")
  else:
    record = pair_record(config, real["fingerprint"], synth["fingerprint"])
    why = _cached_changes(table_path, record)
    if why:
      refuse_stale_pair_table(table_path, why, workdir)  # again, with the banks as built
      if os.path.exists(table_path):
        logging.warning("%s: rebuilding the pair table: %s", table_path, "; ".join(why))
      pc = config.pairs
      table = pairs_lib.build_pair_table(
          real, train_synth, num_pairs=pc.num_pairs, seed=config.seed,
          matched_fraction=pc.matched_fraction, valid_fraction=pc.valid_fraction,
          batch_size=pc.batch_size, align=pc.align, align_angles=tuple(pc.align_angles),
          align_flips=pc.align_flips, balance_bins=pc.balance_bins,
          pool_factor=pc.pool_factor, balance_repeat=pc.get("balance_repeat", False),
          self_fraction=0.0 if has_synth else pc.get("self_fraction", 0.0))
      if parallel.is_main_process():
        banks.drop_record(table_path)
        pairs_lib.write_pairs(table_path, table)
        banks.write_record(table_path, record)
      parallel.sync("pairs written")  # the other processes read it next
      logging.info("Wrote %d pairs to %s", len(table), table_path)
  table = pairs_lib.read_pairs(table_path)
  real_npy = pipeline.save_bank_arrays(cache, "real", real)
  synth_npy = (pipeline.save_bank_arrays(cache, "synth", synth)
               if synth is not real else real_npy)
  return {"real": real, "synth": synth, "table": table, "table_path": table_path,
          "real_npy": real_npy, "synth_npy": synth_npy,
          "test_pairs": test_path or None}


def write_labelled_test_pairs(path: str, real: dict, test_synth: dict, seed: int) -> None:
  """Labelled pairs of held-out synthetic images with known ground truth (the demo).

  Each synthetic image is paired with its source training image under its own label
  (copy -> 1 Duplicate, neighbour -> 2 Similar); images of an unseen head, and every image
  once more with a random training image of another head, give 0 Different pairs.
  """
  rng = np.random.default_rng(seed)
  meta = test_synth["meta"]
  real_subject = real["meta"].get("subject", np.asarray(real["keys"]))
  rows = []
  for j, key in enumerate(test_synth["keys"]):
    src, label = str(meta["source_key"][j]), int(meta["label"][j])
    subj = str(meta.get("subject", [""] * len(test_synth["keys"]))[j])
    if src:
      rows.append((src, key, label))
    others = np.flatnonzero(real_subject != subj)
    if len(others):
      rows.append((str(real["keys"][rng.choice(others)]), key, 0))
  if not rows:
    raise fileio.InputError("no held-out synthetic images: raise data.test_fraction")
  fileio.write_csv(path, ("real_key", "synth_key", "label"), rows)


def train_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
  d = prepare_data(config, workdir)
  table = d["table"]
  sources = {split: pipeline.pair_source(table.select(split), d["real_npy"], d["synth_npy"],
                                         d["real"]["keys"], d["synth"]["keys"], d["table_path"])
             for split in pairs_lib.SPLITS}
  logging.info("Pairs: %d train, %d valid", len(sources["train"]), len(sources["valid"]))
  out = train.train_and_evaluate(config, workdir, sources["train"], sources["valid"])
  result = {"step": out["step"], "val_loss": out.get("val_loss"), "val_mae": out.get("val_mae"),
            "best_val_loss": out["best_val_loss"]}
  if parallel.is_main_process():
    print(f"validation: MSE {result['val_loss']:.5f}  MAE {result['val_mae']:.5f}  "
          f"(best MSE {result['best_val_loss']:.5f}) after {result['step']} steps")
  if d["test_pairs"]:
    result["evaluation"] = evaluate_job(config, workdir, data=d)
  return result


# ----------------------------------------------------------------------------- checkpoints

def parse_checkpoint(spec: str, workdir: str) -> tuple[str, str, int | None]:
  """'best' | 'latest' | 'best:1200' | 'path/to/run:latest[:step]' -> (workdir, which, step)."""
  parts = str(spec).split(":")
  step = None
  if len(parts) > 1 and parts[-1].isdigit():
    step = int(parts.pop())
  which = parts.pop() if parts else ""
  if which not in ("best", "latest"):
    raise ValueError(f"checkpoint {spec!r}: expected [workdir:]best|latest[:step]")
  return (":".join(parts) or workdir), which, step


def load_checkpoint(spec: str, workdir: str, mesh=None) -> dict:
  """The model a checkpoint spec names, with a fingerprint of its weights."""
  run, which, step = parse_checkpoint(spec, workdir)
  model, variables, step = train.restore_model(run, which, step, mesh=mesh)
  logging.info("Loaded the %s checkpoint of %s (step %d)", which, run, step)
  return {"model": model, "variables": variables, "step": int(step), "which": which,
          "run": os.path.abspath(run), "fingerprint": weights_fingerprint(variables)}


def weights_fingerprint(variables) -> str:
  """A hash of a model's weights: what identifies a checkpoint in stores and summaries."""
  return fileio.fingerprint(*[np.asarray(x) for x in jax.tree.leaves(variables)])


# ----------------------------------------------------------------------------- embed / match

def image_source(config: ml_collections.ConfigDict, workdir: str, name: str):
  """The image set config.data.<name> as a random-access source (read lazily, not cached;
  the demo's generated sets are banks)."""
  spec = config.data.get(name)
  if spec is None or not spec.get("kind"):
    raise fileio.InputError(f"config.data.{name}: no image set configured (kind is empty)")
  if spec.kind == "demo":
    b = banks.bank(spec, config, os.path.join(workdir, "data"), name)
    return embed.BankSource(b["keys"], b["images"]), "demo:" + spec.part
  src = banks.open_source(spec, config.data.image_size, config.data.get("download_hint", ""))
  return src, os.path.abspath(spec.root)


def store_folder(config, workdir: str, name: str) -> str:
  return os.path.join(config.embed.dir or os.path.join(workdir, "stores"), name)


def embed_job(config: ml_collections.ConfigDict, workdir: str, sets=None,
              ck: dict | None = None) -> dict:
  """Embeds each configured image set into its store (resumable; see embed.embed_to_store)
  with the checkpoint `ck` (load_checkpoint's dict) or, by default, embed.checkpoint.

  Every mode that reads a store runs this first: it writes the missing shards of a partial
  store (none of a complete one) and refuses a store made from other inputs, naming what
  changed. A store's identity: the checkpoint fingerprint (a hash of the weights), the
  data root, the image ids in order and their number, the image size, dtype and
  shard_rows; its fingerprint (index meta "fingerprint", store.fingerprint) hashes these
  inputs and settings, never the float embeddings (which move in the last bits with the
  batch size), so one set embedded twice records one fingerprint.

  Returns:
    {set name: embed_to_store's dict plus "ids", the set's image ids in order}.
  """
  ec = config.embed
  mesh = parallel.make_mesh()
  ck = ck or load_checkpoint(ec.checkpoint, workdir, mesh)
  embed_fn = embed.make_embed_fn(ck["model"])
  out = {}
  for name in dict.fromkeys(sets or ec.sets):
    src, root = image_source(config, workdir, name)
    keys = np.asarray(src.keys, dtype=str)
    image_size = [int(x) for x in config.data.image_size]
    # The model's compute dtype (model.dtype of the checkpoint's config) moves embeddings by
    # more than batch sizes do: a bfloat16 store is not a float32 one. float32 adds nothing
    # to the hash, so stores written before it was recorded keep their fingerprint.
    compute = embed.compute_dtype(ck["model"])
    fp = fileio.fingerprint(ck["fingerprint"], root, keys, tuple(config.data.image_size), ec.dtype,
                            *(() if compute == "float32" else (compute,)))
    meta = {"set": name, "data_root": root, "checkpoint": f"{ck['run']}:{ck['which']}",
            "step": ck["step"], "model": config.model.name, "image_size": image_size}
    identity = {"checkpoint": ck["fingerprint"], "data_root": root, "image_size": image_size,
                "compute_dtype": compute}
    out[name] = embed.embed_to_store(
        embed_fn, ck["variables"], src, store_folder(config, workdir, name),
        batch_size=ec.batch_size, shard_rows=ec.shard_rows, fingerprint=fp, meta=meta,
        dtype=ec.dtype, mesh=mesh, num_threads=ec.num_threads,
        progress=True, stop_after_shards=ec.get("stop_after_shards"), identity=identity)
    out[name]["ids"] = keys
    if parallel.is_main_process():
      r = out[name]
      print(f"embed {name}: {r['n']} images, {r['written']} shards written, {r['skipped']} "
            f"already done; {r['images_per_s']:.1f} img/s, "
            f"{100 * r['input_wait_fraction']:.0f}% waiting on input")
  return out


def set_embeddings(config: ml_collections.ConfigDict, workdir: str, name: str,
                   ck: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids, embeddings) of the image set config.data.<name>, from its store.

  The embed job runs first: it writes only the shards that are missing (none when the
  store is complete) and refuses a store made by another checkpoint or from other images.
  The store is then read only if its rows are exactly the set's ids, in order.
  """
  r = embed_job(config, workdir, sets=(name,), ck=ck)[name]
  if not r["complete"]:
    raise fileio.InputError(f"{r['folder']}: store incomplete after embedding ({r['n']} images)")
  return store.load_store(r["folder"], source_ids=r["ids"])


def match_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Top-k training neighbours of every synthetic image (streamed), optionally the full
  float16 matrix in the reference's npz format."""
  mc = config.match
  # Both stores made complete first (written, finished if a job was killed, or checked:
  # embed_job writes nothing for a complete store of these inputs and refuses one of
  # others); match then reads them only if their rows are exactly their sets' ids.
  emb = embed_job(config, workdir, sets=(mc.query, mc.reference))
  query, ref = emb[mc.query]["folder"], emb[mc.reference]["folder"]
  q_src, r_src = emb[mc.query]["ids"], emb[mc.reference]["ids"]
  out_dir = os.path.join(workdir, "match")
  res = match_lib.match_stores(query, ref, os.path.join(out_dir, f"top{mc.k}.csv"), mc.k,
                               q_block=mc.q_block, r_block=mc.r_block,
                               query_ids=q_src, ref_ids=r_src)
  if mc.full_matrix:
    q_ids, q_emb = store.load_store(query, source_ids=q_src)
    r_ids, r_emb = store.load_store(ref, source_ids=r_src)
    if len(q_ids) * len(r_ids) > mc.full_matrix_max_entries:
      raise fileio.InputError(f"full matrix of {len(r_ids)} x {len(q_ids)} exceeds "
                          f"match.full_matrix_max_entries={mc.full_matrix_max_entries}")
    res["npz"] = ref_matrix.write_reference_npz(
        out_dir, r_ids, q_ids, ref_matrix.full_matrix(r_emb, q_emb))
  if parallel.is_main_process():
    print(f"match: top-{mc.k} training neighbours of {res['n_query']} synthetic images among "
          f"{res['n_ref']} -> {res['path']}")
  return res


# ----------------------------------------------------------------------------- evaluate

def metric_context(metric: str, config, workdir: str, real: dict) -> dict:
  """What a metric needs beyond the pair (metrics.METRICS)."""
  ec = config.eval
  ctx = {"batch_size": ec.batch_size, "ssim_batch_size": config.pairs.batch_size,
         "train_images": real["images"], "carlini_alpha": ec.carlini_alpha,
         "carlini_n": ec.carlini_n, "seed": config.seed,
         "weights": ec.get("weights", {}),
         "weights_torchscript": ec.get("weights_torchscript", False),
         "clip_model": ec.clip.model, "clip_act": ec.clip.act}
  base, _, ck = metric.partition("@")
  if base in ("deepssim", "deepssim_aligned"):
    c = load_checkpoint(ck or ec.checkpoint, workdir)
    ctx.update(model=c["model"], variables=c["variables"],
               embed_fn=embed.make_embed_fn(c["model"]))
  elif base == "convnext_raw":
    ctx["model"] = train.model_from_config(config)
  return ctx


def misalign(images: np.ndarray, seed: int, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """The paper's misaligned evaluation (arXiv 2509.16582): flips, rotation, gamma at
  probability p on every image, seeded (the same seed gives the same transforms)."""
  a = augment.AugmentConfig(p_flip0=cfg.p, p_flip1=cfg.p, p_rotate=cfg.p, p_gamma=cfg.p,
                            max_angle=cfg.max_angle, gamma_min=cfg.gamma_min,
                            gamma_max=cfg.gamma_max, renormalize=True)
  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, a))
  out = np.empty_like(images, dtype=np.float32)
  key = jax.random.key(seed)
  for i, s in enumerate(range(0, len(images), 256)):
    out[s:s + 256] = np.asarray(fn(jax.random.fold_in(key, i), jnp.asarray(images[s:s + 256])))
  return out


def score_pairs(metric: str, ctx: dict, a: np.ndarray, b: np.ndarray, chunk: int) -> np.ndarray:
  """A metric over paired stacks, chunk by chunk (bounded memory)."""
  fn = metrics_lib.get(metric)
  return np.concatenate([fn(ctx, a[s:s + chunk], b[s:s + chunk])
                         for s in range(0, len(a), chunk)]).astype(np.float64)


def split_for_fitting(synth_keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """True for pairs whose synthetic image is in the threshold-fitting split (by image)."""
  u = np.unique(synth_keys)
  fit = set(u[np.random.default_rng(seed).random(len(u)) < fraction].tolist())
  return np.asarray([k in fit for k in synth_keys.tolist()])


MATRIX_PREFIX = "matrix:"


def matrix_metric_paths(metric: str) -> tuple[str, str, str] | None:
  """The files of an eval.metrics entry that names a precomputed score matrix, else None.

  'matrix:<m.npz>' reads <m.npz> with real.npz and synth.npz beside it (the match job's
  layout, write_reference_npz); 'matrix:<m.npz>,<real.npz>,<synth.npz>' names all three, as
  the reference's scripts/eval.py takes them (its matrices and indices live in two folders).
  So the reference's own matrices (dar, chen, semdedup, deepssim) are scored on the same
  labelled pairs, by the same code, as our metrics.
  """
  if not metric.startswith(MATRIX_PREFIX):
    return None
  parts = [p.strip() for p in metric[len(MATRIX_PREFIX):].split(",")]
  if len(parts) == 1 and parts[0]:
    folder = os.path.dirname(parts[0])
    return parts[0], os.path.join(folder, "real.npz"), os.path.join(folder, "synth.npz")
  if len(parts) == 3 and all(parts):
    return parts[0], parts[1], parts[2]
  raise fileio.InputError(f"eval.metrics entry {metric!r}: expected 'matrix:<matrix.npz>' or "
                      "'matrix:<matrix.npz>,<real.npz>,<synth.npz>'")


def evaluate_job(config: ml_collections.ConfigDict, workdir: str, data: dict | None = None
                 ) -> dict:
  """Scores labelled pairs with every configured metric (and checkpoint); one table.

  For each metric: results at the configured thresholds on all pairs, and, when
  eval.fit_fraction > 0, thresholds fitted (max macro F1) on a split of the synthetic
  images and results on the other pairs. With eval.misaligned, each metric is also scored
  after seeded flips/rotations/gamma (p = 0.8) of both images. A 'matrix:' entry
  (matrix_metric_paths) reads its scores from a precomputed matrix (no misaligned variant);
  when every entry is one, no image is read and only data.test_pairs_csv is needed.
  """
  ec = config.eval
  matrices = {m: matrix_metric_paths(m) for m in ec.metrics}
  if data is None and matrices and all(matrices.values()):
    d = {"test_pairs": config.data.test_pairs_csv or None}  # scores come from the files
  else:
    d = prepare_data(config, workdir, pair_table=False) if data is None else data
  if not d["test_pairs"]:
    raise fileio.InputError("nothing to evaluate: set data.test_pairs_csv (real_key, synth_key, "
                        "label)")
  pairs = eval_lib.read_labelled_pairs(d["test_pairs"])
  variants = [("aligned", None, None)]
  if "real" in d:
    ia = fileio.key_rows(d["real"]["keys"], pairs["real_key"], "the real image set",
                         csv_file=d["test_pairs"])
    ib = fileio.key_rows(d["synth"]["keys"], pairs["synth_key"], "the synthetic image set",
                         csv_file=d["test_pairs"])
    a, b = d["real"]["images"][ia], d["synth"]["images"][ib]
    variants = [("aligned", a, b)]
    if ec.misaligned.enabled:
      variants.append(("misaligned", misalign(a, ec.misaligned.seed, ec.misaligned),
                       misalign(b, ec.misaligned.seed + 1, ec.misaligned)))
  labels = np.asarray(pairs["label"])
  # One synthetic image in two spellings is one image of the fitting split.
  synth_keys = np.asarray([fileio.canonical_key(k) for k in pairs["synth_key"]], str)
  fit = (split_for_fitting(synth_keys, ec.fit_fraction, config.seed)
         if ec.fit_fraction > 0 else np.zeros(len(labels), bool))
  t_low, t_high = ec.thresholds
  out_dir = os.path.join(workdir, "eval")
  rows, results = [], {}
  for metric in ec.metrics:
    paths = matrices[metric]
    source = None if paths else metrics_lib.weights_source(metric, ec.get("weights"))
    if source == "missing":  # reported in the table and results.json, not scored
      msg = metrics_lib.missing_message(metric)
      logging.warning("evaluate: %s", msg)
      results[metric] = {"missing": msg}
      rows.append({"name": f"{metric} [missing weights]"})
      continue
    th_metric = ((t_low, t_high) if paths or not ec.reference_thresholds
                 else metrics_lib.reference_thresholds(metric) or (t_low, t_high))
    if paths:
      precomputed = ref_matrix.matrix_scores(
          *ref_matrix.read_reference_matrix(*paths), pairs["real_key"], pairs["synth_key"],
          real_name=f"{d['test_pairs']}: real ids of {paths[1]}",
          synth_name=f"{d['test_pairs']}: synthetic ids of {paths[2]}")
    else:
      ctx = metric_context(metric, config, workdir, d["real"])
    for variant, va, vb in variants:
      if paths and variant != "aligned":
        continue  # precomputed scores of the aligned images only
      label = f"{metric} [random weights]" if source == metrics_lib.RANDOM_WEIGHTS else metric
      name = label if variant == "aligned" else f"{label} (misaligned)"
      scores = precomputed if paths else score_pairs(metric, ctx, va, vb, ec.chunk)
      res = {"fixed": eval_lib.evaluate_scores(labels, scores, *th_metric)}
      if "ssim" in pairs:  # ground-truth SSIM column: the reference's regression errors
        res["regression"] = eval_lib.regression_errors(scores, pairs["ssim"])
      row = eval_lib.summary_row(name, res["fixed"])
      if fit.any() and (~fit).any():
        th = eval_lib.fit_thresholds(labels[fit], scores[fit])
        res["fitted"] = dict(eval_lib.evaluate_scores(labels[~fit], scores[~fit], th["t_low"],
                                                      th["t_high"]), fit=th)
        row["fitted_macro_f1"] = res["fitted"]["macro_f1"]
        row["fitted_t"] = f"{th['t_low']:.3g}/{th['t_high']:.3g}"
      results[name] = res
      rows.append(row)
      if parallel.is_main_process():
        safe = name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_") \
            .replace("@", "_").replace(":", "_")
        # A matrix file is named after its metric (<metric>[_augmented].npz); its paths would
        # make a file name too long: the file's stem and a hash of the entry instead.
        stem = os.path.basename(paths[0]).removesuffix(".npz") if paths else ""
        if paths:
          safe = f"matrix_{stem}_{fileio.fingerprint(metric)[:8]}"
        base = stem.removesuffix("_augmented") if paths else metric.split("@")[0]
        plot_t = (th_metric if base in metrics_lib.SSIM_SCALED or paths
                  or metrics_lib.reference_thresholds(base) or "fitted" not in res
                  else (res["fitted"]["t_low"], res["fitted"]["t_high"]))
        eval_lib.plot_histogram(os.path.join(out_dir, f"hist_{safe}.png"), scores, labels,
                                *plot_t, title=f"{name} on test pairs")
  if parallel.is_main_process():
    eval_lib.write_results(os.path.join(out_dir, "results.json"), results)
    eval_lib.plot_macro_f1(os.path.join(out_dir, "macro_f1.png"), rows)
    table = eval_lib.results_table(rows)
    for name, res in results.items():
      if "missing" in res:
        table += f"\n{res['missing']}"
      if "regression" in res:
        r = res["regression"]
        table += (f"\n{name}: against the ground-truth SSIM column, MAE {r['mae']:.4f} "
                  f"+- {r['mae_std']:.4f}, RMSE {r['rmse']:.4f} +- {r['rmse_std']:.4f}")
    if "raters" in pairs:  # the annotators' agreement on the labelled pairs
      kappa = eval_lib.fleiss_kappa(pairs["raters"])
      fileio.write_json(os.path.join(out_dir, "agreement.json"),
                        fileio.json_ready({"fleiss_kappa": kappa, "n": len(labels),
                                           "raters": list(eval_lib.RATER_COLUMNS)}))
      table += (f"\nFleiss' kappa of {', '.join(eval_lib.RATER_COLUMNS)} on {len(labels)} "
                f"pairs: {kappa:.4f}")
    fileio.write_text(os.path.join(out_dir, "table.txt"), table + "\n")
    print(table)
  return results


def _audit_hooks(config, workdir: str) -> dict:
  """The audit's embedding and fingerprint functions and its model (for the report's
  explanation maps), with the checkpoint restored once.

  "embeddings" finishes (or writes, or checks) the set's store and reads it only if its
  rows are exactly the set's ids (set_embeddings). "embedding_fingerprint" (cfg, wd, name)
  -> the fingerprint the set's complete store records (store.fingerprint), a hash of inputs
  and settings that is the same for any embed.batch_size, unlike a hash of the float
  embeddings; for the audit's summary in place of one.
  """
  ck = load_checkpoint(config.embed.checkpoint, workdir, parallel.make_mesh())
  return {"embeddings": lambda cfg, wd, spec, name: set_embeddings(cfg, wd, name, ck),
          "checkpoint_fingerprint": lambda cfg, wd: ck["fingerprint"],
          "embedding_fingerprint": lambda cfg, wd, name: store.fingerprint(
              store_folder(cfg, wd, name)),
          "model": lambda cfg, wd: (ck["model"], ck["variables"])}


def audit_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The memorization audit (deepssim_jax.audit) on store-backed embeddings."""
  hooks = _audit_hooks(config, workdir)
  out = audit_lib.audit_job(config, workdir, hooks["embeddings"],
                            checkpoint_fingerprint=hooks["checkpoint_fingerprint"],
                            embedding_fingerprint=hooks["embedding_fingerprint"],
                            model=hooks["model"])
  if parallel.is_main_process():
    s = out["summary"]
    print(f"audit: {s['n_synthetic']} synthetic images, {100 * s['memorization_rate']:.1f}% "
          f"Duplicate, {100 * s['share_training_copied']:.1f}% of training images copied; "
          f"report: {os.path.join(out['out_dir'], 'report.html')}")
  return out


def compare_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Audits each of compare.synthetic and tabulates their memorization rates."""
  hooks = _audit_hooks(config, workdir)
  return compare_lib.compare_job(config, workdir, hooks["embeddings"],
                                 checkpoint_fingerprint=hooks["checkpoint_fingerprint"],
                                 embedding_fingerprint=hooks["embedding_fingerprint"],
                                 model=hooks["model"])


MODES = {"train": train_job, "evaluate": evaluate_job, "embed": embed_job, "match": match_job,
         "audit": audit_job, "compare": compare_job,
         "pairs": lambda config, workdir: {"pairs": len(prepare_data(config, workdir)["table"])}}
