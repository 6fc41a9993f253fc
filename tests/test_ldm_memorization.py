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
import subprocess
import sys

import numpy as np

from deepssim_jax import ssim
from deepssim_jax.data import images as images_lib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
THRESHOLD = 0.85


def _cli(workdir, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  cmd = [sys.executable, "-m", "ldm_jax.main", "--config=configs/ldm_memorization.py",
         f"--workdir={workdir}", *args]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


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
