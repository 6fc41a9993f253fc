"""LDM second stage on the embedded demo slices, and generation: minutes on 2 CPU cores.

Latents of the demo autoencoder (run configs/ldm_demo_autoencoder.py first), a tiny UNet
conditioned on synthetic covariates (the demo volumes have no demographics:
<workdir>/covariates.csv is made deterministically, see ldm_jax/input_pipeline.py),
duplication "low"; generation writes 4 samples per training slice.

    python -m ldm_jax.main --config=configs/ldm_demo_diffusion.py \
        --workdir=workdirs/ldm_demo_diffusion \
        --config.autoencoder.workdir=workdirs/ldm_demo_autoencoder
    python -m ldm_jax.main --config=configs/ldm_demo_diffusion.py --mode=generate \
        --workdir=workdirs/ldm_demo_diffusion \
        --config.autoencoder.workdir=workdirs/ldm_demo_autoencoder
"""

from ldm_jax import config_lib

DEMO = dict(slices_per_head=8, num_copies=1, num_neighbours=1, num_other=1,
            heldout_per_head=0)


def get_config():
  c = config_lib.diffusion_config()
  c.workdir = "workdirs/ldm_demo_diffusion"
  c.data = config_lib.data_config("demo", part="real")
  c.data.demo.update(DEMO)
  c.autoencoder.workdir = "workdirs/ldm_demo_autoencoder"
  c.model.name = "DiffusionModelUNet_tiny"
  c.cond.kind = "covariates"
  c.duplication.mode = "low"
  c.optim.learning_rate = 1e-3
  c.train.batch_size = 16
  c.train.num_epochs = 0
  c.train.num_steps = 400
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.train.sample_every_steps = 200
  c.generate.num_samples = 4
  c.generate.batch_size = 32
  return c
