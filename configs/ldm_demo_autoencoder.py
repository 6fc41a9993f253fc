"""LDM first stage on the embedded demo slices: tiny networks, minutes on 2 CPU cores.

32 real slices (8 per head of four vendored volumes), AutoencoderKL_tiny and
PatchDiscriminator_tiny, the reference's losses and optimiser at a higher learning rate.

    python -m ldm_jax.main --config=configs/ldm_demo_autoencoder.py \
        --workdir=workdirs/ldm_demo_autoencoder
"""

from ldm_jax import config_lib

DEMO = dict(slices_per_head=8, num_copies=1, num_neighbours=1, num_other=1,
            heldout_per_head=0)


def get_config():
  c = config_lib.autoencoder_config()
  c.workdir = "workdirs/ldm_demo_autoencoder"
  c.data = config_lib.data_config("demo", part="real")
  c.data.demo.update(DEMO)
  c.model.name = "AutoencoderKL_tiny"
  c.disc.name = "PatchDiscriminator_tiny"
  c.optim.learning_rate = 1e-3
  c.optim.d_learning_rate = 1e-3
  c.loss.adv_warmup_steps = 100
  c.train.num_epochs = 0
  c.train.num_steps = 300
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 100
  c.train.sample_every_steps = 100
  return c
