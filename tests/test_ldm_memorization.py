"""End to end: an over-trained diffusion model memorizes its training slices; an early one not.

Runs the real entrypoint (`python -m ldm_jax.main`) on configs/ldm_memorization.py: pixel
space (identity first stage), 4 embedded slices at 16 x 16, a tiny UNet conditioned on the
slices' synthetic covariates. Stopped after 20 steps, generation gives noise; resumed from
that checkpoint to 800 steps, most generated images are near-copies of a training image
(nearest training image by SSIM, deepssim_jax.ssim, above 0.85): memorization reproduced,
and read back from the layout DeepSSIM consumes.

The CLI runs in a subprocess without conftest's 4 fake devices and LLVM -O0 (3x faster
steps for this loop), sharing the persistent compilation cache.
"""

import glob
import os

import numpy as np

from deepssim_jax import ssim
from deepssim_jax.data import images as images_lib
import run_cli  # tests/run_cli.py (pytest puts tests/ on sys.path)

THRESHOLD = 0.85


# Fewer loss rows, plots and checkpoints than the config's every 20 steps (the first run
# still checkpoints at its last step, 20, which the second resumes from).
_QUIET = ("--config.train.log_every_steps=100", "--config.train.checkpoint_every_steps=400")


def _cli(workdir, *args):
  return run_cli.run("ldm_jax.main", "configs/ldm_memorization.py", workdir, *_QUIET, *args,
                     timeout=600)


def _nearest_ssim(out_dir):
  train, gens = [], []
  for folder in sorted(glob.glob(os.path.join(out_dir, "*"))):
    train.append(images_lib.read_png(os.path.join(folder, "training.png")))
    gens += [images_lib.read_png(p) for p in sorted(glob.glob(os.path.join(folder, "gen-*")))]
  m = ssim.ssim_matrix(np.stack(gens), np.stack(train))
  return m.max(axis=1)


def test_overtrained_model_memorizes_and_early_model_does_not(tmp_path):
  wd = str(tmp_path / "run")
  _cli(wd, "--mode=diffusion", "--config.train.num_steps=20")
  _cli(wd, "--mode=generate", f"--config.generate.out_dir={tmp_path / 'early'}")
  _cli(wd, "--mode=diffusion")  # resumes from step 20
  _cli(wd, "--mode=generate", f"--config.generate.out_dir={tmp_path / 'late'}")
  early = _nearest_ssim(str(tmp_path / "early"))
  late = _nearest_ssim(str(tmp_path / "late"))
  assert len(early) == len(late) == 8  # 4 slices x 2 samples
  assert np.mean(late > THRESHOLD) > 0.5, late       # most samples are near-copies
  assert np.median(late) > THRESHOLD, late
  assert np.mean(early > THRESHOLD) <= 0.125, early  # the early model's are not
  assert np.median(late) > np.median(early) + 0.5
