"""How close a diffusion run's samples come to its training images: nearest-neighbour SSIM.

`--mode=nearest` reads the generation layout of a run (<out>/<uid>/gen-<i>.png, written by
--mode=generate) and, for every sample, finds the training slice of highest SSIM (both
z-scored, 7 x 7 window, deepssim_jax.ssim; the pixel-level memorization baseline of the
study) among all the run's training records. It writes beside the folder

  <out>.nearest.csv   uid, sample, nearest_key, nearest_ssim, own_ssim (SSIM to the record
                      the sample was generated for)
  <out>.nearest.json  the summary: count, median, mean, 10th/90th percentiles, and the same
                      median for as many uniform-noise images (the floor of the measure)
  <out>.nearest.png   the samples of highest, median and lowest nearest SSIM above their
                      nearest training slices

and logs the median. It refuses an incomplete generation (a record's folder without all
its samples) rather than measure part of it.
"""

import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import fileio, parallel, ssim
from deepssim_jax.data.images import read_png, zscore
from ldm_jax import common, generate, input_pipeline


def best_matches(samples: np.ndarray, training: np.ndarray, block: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(index, SSIM) of each sample's most similar training image; both sets z-scored."""
  stats = ssim.image_stats(jax.numpy.asarray(training))
  idx, best = [], []
  for i in range(0, len(samples), block):
    m = np.asarray(ssim.ssim_all_pairs(jax.numpy.asarray(samples[i:i + block]), stats))
    idx.append(m.argmax(1))
    best.append(m.max(1))
  return np.concatenate(idx), np.concatenate(best)


def summary(values: np.ndarray) -> dict:
  v = np.asarray(values, np.float64)
  return {"count": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
          "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def nearest(config: ml_collections.ConfigDict, workdir: str, mesh=None,
            out_dir: Optional[str] = None) -> dict:
  """Measures the samples of a diffusion run (module docstring).

  Args:
    config: the diffusion run's config (generate.num_samples, generate.out_dir).
    workdir: the diffusion run's workdir.
    mesh: unused (the SSIM runs on the default device).
    out_dir: the generation folder (default generate.out_dir, else <workdir>/generated).

  Returns:
    The summary dict (module docstring), with the uniform-noise floor as "noise_median".

  Raises:
    InputError: no generation, or an incomplete one.
  """
  del mesh
  gc = config.generate
  out_dir = out_dir or gc.get("out_dir", "") or os.path.join(workdir, "generated")
  records = input_pipeline.load_records(config, workdir)
  n = int(gc.num_samples)
  missing = [u for u in records["uids"]
             if not generate.is_complete(os.path.join(out_dir, u), n)]
  if missing:
    raise fileio.InputError(f"{out_dir}: {len(missing)} of {len(records['uids'])} records lack "
                        f"their {n} samples (e.g. {missing[0]}); run --mode=generate first "
                        "(it resumes)")
  paths = [(r, i, os.path.join(out_dir, u, generate.gen_name(i)))
           for r, u in enumerate(records["uids"]) for i in range(n)]
  samples = zscore(np.stack([read_png(p) for _, _, p in paths]), [p for _, _, p in paths])
  training = zscore(records["images"], records["keys"])
  logging.info("Nearest training slice of %d samples among %d training slices",
               len(samples), len(training))
  idx, best = best_matches(samples, training)
  own_rows = np.asarray([r for r, _, _ in paths])
  own = np.concatenate([np.asarray(ssim.ssim_pairs(
      jax.numpy.asarray(samples[i:i + 256]), jax.numpy.asarray(training[own_rows[i:i + 256]])))
                        for i in range(0, len(samples), 256)])
  noise = np.random.default_rng(0).uniform(size=samples.shape).astype(np.float32)
  _, noise_best = best_matches(zscore(noise), training)
  result = {**summary(best), "noise_median": float(np.median(noise_best)),
            "samples_per_record": n, "records": len(training), "out_dir": out_dir}
  if parallel.is_main_process():
    fileio.write_csv(f"{out_dir}.nearest.csv",
                 ["uid", "sample", "nearest_key", "nearest_ssim", "own_ssim"],
                 ([records["uids"][r], i, records["keys"][idx[k]], f"{best[k]:.6f}",
                   f"{own[k]:.6f}"] for k, (r, i, _) in enumerate(paths)))
    fileio.write_json(f"{out_dir}.nearest.json", result)
    order = np.argsort(-best)
    pick = np.unique(order[np.linspace(0, len(order) - 1, min(8, len(order))).round()
                           .astype(int)])
    pick = pick[np.argsort(-best[pick])]
    common.image_grid(f"{out_dir}.nearest.png",
                      np.concatenate([samples[pick], training[idx[pick]]]), ncols=len(pick),
                      titles=[f"{best[k]:.2f}" for k in pick] + [
                          records["keys"][idx[k]] for k in pick])
  logging.info("Nearest-training SSIM of %d samples: median %.3f (p10 %.3f, p90 %.3f); "
               "uniform noise: median %.3f", result["count"], result["median"], result["p10"],
               result["p90"], result["noise_median"])
  return result
