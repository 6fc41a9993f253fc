"""DeepSSIM end to end on the embedded data: pairs -> train -> evaluate, on 2 CPU cores.

The five vendored brain MRI volumes give a training set of real slices and a synthetic
set of augmented copies (Duplicate), neighbouring slices (Similar) and another head
(Different). A tiny ConvNeXt learns SSIM; held-out synthetic images are scored by
DeepSSIM and by plain SSIM.

    python -m deepssim_jax.main --config=configs/demo.py --workdir=workdirs/demo
    python -m deepssim_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=audit
"""

from deepssim_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.workdir = "workdirs/demo"
  c.data.real = config_lib.source_config("demo", part="real")
  c.data.synth = config_lib.source_config("demo", part="synthetic")
  # Real slices of the training heads seen by neither set (the audit's Dar et al. threshold).
  c.data.heldout = config_lib.source_config("demo", part="heldout")
  c.pairs.num_pairs = 3000
  c.pairs.align = True  # copies are flipped/rotated: align before the SSIM target
  c.pairs.align_angles = (-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15)
  c.data.test_fraction = 0.3  # synthetic images held out (never in the pair table)
  c.data.demo.update(dict(slices_per_head=24, num_copies=96, num_neighbours=64,
                          num_other=32, heldout_per_head=6))
  c.model.name = "convnext_atto"
  c.model.overrides = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), hidden_dim=128,
                           embed_dim=64)
  c.model.num_frozen_stages = 0
  c.train.batch_size = 32
  c.train.num_epochs = 5
  c.train.log_every_steps = 20
  return c
