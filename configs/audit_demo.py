"""The memorization audit on the embedded data, with known answers: train, then audit.

A smaller, faster variant of configs/demo.py (68 x 56 images, about two minutes of training
on 2 CPU cores) whose synthetic set is made for the audit question: 192 augmented copies of
training slices (flips, rotations up to 0.17 rad, gamma), 96 slices of the training heads
8-12 mm from their nearest training slice, and 32 slices of a head never trained on. The
audit should flag the copies and neither of the others (tests/test_audit_recall.py).

    python -m deepssim_jax.main --config=configs/audit_demo.py --workdir=workdirs/audit_demo
    python -m deepssim_jax.main --config=configs/audit_demo.py --workdir=workdirs/audit_demo \
        --mode=audit

Two settings differ from the paper's, both needed for a model trained in minutes:
* pairs.balance_bins: the pair table spreads its SSIM targets evenly over [0, 1] (uniform
  pairs are almost all unrelated images, and the decision lives at 0.6-1);
* aug probabilities 0.2 instead of 0.33 (less augmentation to learn through in 10 epochs).
"""

from deepssim_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.workdir = "workdirs/audit_demo"
  c.data.image_size = (68, 56)
  c.data.real = config_lib.source_config("demo", part="real")
  c.data.synth = config_lib.source_config("demo", part="synthetic")
  c.data.heldout = config_lib.source_config("demo", part="heldout")
  c.data.test_fraction = 0.3  # synthetic images never in the pair table
  c.data.demo.update(dict(slices_per_head=8, num_copies=192, num_neighbours=96,
                          neighbour_mm=(8.0, 12.0), num_other=32, heldout_per_head=2))
  c.pairs.num_pairs = 3000
  c.pairs.align = True  # copies are flipped/rotated: align before the SSIM target
  c.pairs.align_angles = (-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15)
  c.pairs.balance_bins = 10
  c.pairs.pool_factor = 4.0
  c.model.name = "convnext_atto"
  c.model.overrides = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), hidden_dim=128,
                           embed_dim=64)
  c.model.num_frozen_stages = 0
  c.train.batch_size = 32
  c.train.num_epochs = 10
  c.train.log_every_steps = 50
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  for k in ("p_flip0", "p_flip1", "p_rotate", "p_gamma"):
    c.aug[k] = 0.2
  return c
