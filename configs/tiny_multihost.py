"""A seconds-long DeepSSIM run for multi-process tests (tests/test_multihost.py).

The embedded demo data at 32x32, a tiny ConvNeXt-atto, a global batch of 8 pairs on 4
devices (2 rows per device), 2 epochs, then the evaluation on held-out labelled pairs.
Adam's eps is raised as in test_train's 4-vs-1 device test: it keeps the comparison of runs
with different reduction orders well-conditioned.

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/tiny_multihost.py --workdir=/tmp/tiny_2x2
"""

from deepssim_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.workdir = "workdirs/tiny_multihost"
  c.data.image_size = (32, 32)
  c.data.real = config_lib.source_config("demo", part="real")
  c.data.synth = config_lib.source_config("demo", part="synthetic")
  c.data.num_threads = 1
  c.data.test_fraction = 0.3  # held-out synthetic images: training ends with an evaluation
  c.data.demo.update(dict(slices_per_head=4, num_copies=8, num_neighbours=8, num_other=4,
                          heldout_per_head=0))
  c.pairs.num_pairs = 48
  c.pairs.batch_size = 16
  c.pairs.valid_fraction = 0.2
  c.model.name = "convnext_atto"
  c.model.num_frozen_stages = 0  # freezing needs model.init_from
  # depthwise_impl 'conv' compiles ~5x faster on CPU (test_models: same numbers).
  c.model.overrides = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), hidden_dim=32,
                           embed_dim=16, depthwise_impl="conv")
  c.optim.eps = 1e-3
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_epochs = 2
  c.train.log_every_steps = 1
  c.eval.batch_size = 8
  return c
