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
"""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import (banks, embed, evaluate as eval_lib, io, pairs as pairs_lib, parallel,
                          pipeline, train)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Image banks and the pair table, built once into the workdir and reused after."""
  cache = os.path.join(workdir, "data")
  real = banks.bank(config.data.real, config, cache, "real", config.data.num_threads)
  synth = (banks.bank(config.data.synth, config, cache, "synth", config.data.num_threads)
           if config.data.synth.kind else real)
  test_path = config.data.test_pairs_csv
  meta = synth.get("meta", {})
  train_synth = synth
  if not test_path and config.data.get("test_fraction", 0) and "label" in meta:
    # The demo knows each synthetic image's class: hold out a share of synthetic images
    # (never in the pair table) and label their pairs for the final evaluation.
    is_test = np.random.default_rng(config.seed + 1).random(len(synth["keys"])) < \
        config.data.test_fraction
    test_path = os.path.join(workdir, "test_pairs.csv")
    if not os.path.exists(test_path):
      write_labelled_test_pairs(test_path, real, banks.subset(synth, is_test), config.seed)
    train_synth = banks.subset(synth, ~is_test)
  table_path = config.data.pairs_csv or os.path.join(workdir, "pairs.csv")
  if not os.path.exists(table_path):
    if config.data.pairs_csv:
      raise io.InputError(f"{table_path}: pair table not found")
    pc = config.pairs
    table = pairs_lib.build_pair_table(
        real, train_synth, num_pairs=pc.num_pairs, seed=config.seed,
        matched_fraction=pc.matched_fraction, valid_fraction=pc.valid_fraction,
        batch_size=pc.batch_size, align=pc.align, align_angles=tuple(pc.align_angles),
        align_flips=pc.align_flips)
    if parallel.is_main_process():
      pairs_lib.write_pairs(table_path, table)
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
    raise io.InputError("no held-out synthetic images: raise data.test_fraction")
  io.write_csv(path, ("real_key", "synth_key", "label"), rows)


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


def score_pairs(metric: str, config, workdir: str, real: dict, synth: dict, real_keys,
                synth_keys, source: str) -> np.ndarray:
  """Scores labelled pairs with a metric: 'deepssim' (this run's checkpoint) or 'ssim'."""
  ia = pairs_lib.key_index(real["keys"], np.asarray(real_keys), "real", source)
  ib = pairs_lib.key_index(synth["keys"], np.asarray(synth_keys), "synthetic", source)
  if metric == "ssim":
    return pairs_lib.compute_ssim(real["images"], synth["images"], ia, ib,
                                  batch_size=config.pairs.batch_size).astype(np.float64)
  if metric == "deepssim":
    model, variables, step = train.restore_model(workdir, config.eval.checkpoint)
    logging.info("DeepSSIM scores from the %s checkpoint (step %d)", config.eval.checkpoint, step)
    ua, ub = np.unique(ia), np.unique(ib)
    ea = embed.embed_array(model, variables, real["images"][ua], config.eval.batch_size)
    eb = embed.embed_array(model, variables, synth["images"][ub], config.eval.batch_size)
    return embed.cosine_pairs(ea[np.searchsorted(ua, ia)], eb[np.searchsorted(ub, ib)])
  raise ValueError(f"unknown metric {metric!r}")


def evaluate_job(config: ml_collections.ConfigDict, workdir: str, data: dict | None = None
                 ) -> dict:
  """Scores the labelled test pairs with each configured metric; prints one table."""
  d = prepare_data(config, workdir) if data is None else data
  if not d["test_pairs"]:
    raise io.InputError("nothing to evaluate: set data.test_pairs_csv (real_key, synth_key, "
                        "label)")
  pairs = eval_lib.read_labelled_pairs(d["test_pairs"])
  t_low, t_high = config.eval.thresholds
  out_dir = os.path.join(workdir, "eval")
  rows, results = [], {}
  for metric in config.eval.metrics:
    scores = score_pairs(metric, config, workdir, d["real"], d["synth"], pairs["real_key"],
                         pairs["synth_key"], d["test_pairs"])
    res = eval_lib.evaluate_scores(pairs["label"], scores, t_low, t_high)
    results[metric] = res
    rows.append(eval_lib.summary_row(metric, res))
    if parallel.is_main_process():
      eval_lib.plot_histogram(os.path.join(out_dir, f"hist_{metric}.png"), scores,
                              pairs["label"], t_low, t_high, title=f"{metric} on test pairs")
  if parallel.is_main_process():
    eval_lib.write_results(os.path.join(out_dir, "results.json"), results)
    table = eval_lib.results_table(rows)
    io.write_text(os.path.join(out_dir, "table.txt"), table + "\n")
    print(table)
  return results


MODES = {"train": train_job, "evaluate": evaluate_job,
         "pairs": lambda config, workdir: {"pairs": len(prepare_data(config, workdir)["table"])}}
