"""LDM second stage on the embedded demo slices, and generation: minutes on 2 CPU cores.

Latents of the demo autoencoder (run configs/ldm_demo_autoencoder.py first; 68 x 56
slices, latents 3 x 17 x 14 padded to 3 x 20 x 16), a tiny UNet conditioned on synthetic
covariates (the demo volumes have no demographics: <workdir>/covariates.csv is made
deterministically, see ldm_jax/input_pipeline.py), duplication "low". What the small
setting needs for samples that look like slices in minutes: latents scaled to unit
variance (scale factor 0), a 100-step noise schedule with the reference's end points
(alpha-bar ~ 1e-4, so every timestep is seen often), a high learning rate and an EMA of
the weights (decay 0.99) to sample from. Generation writes 4 samples per training slice;
--mode=nearest measures how close they come to the training slices.

    python -m ldm_jax.main --config=configs/ldm_demo_diffusion.py \
        --workdir=workdirs/ldm_demo_diffusion \
        --config.autoencoder.workdir=workdirs/ldm_demo_autoencoder
    python -m ldm_jax.main --config=configs/ldm_demo_diffusion.py --mode=generate \
        --workdir=workdirs/ldm_demo_diffusion \
        --config.autoencoder.workdir=workdirs/ldm_demo_autoencoder
    python -m ldm_jax.main --config=configs/ldm_demo_diffusion.py --mode=nearest \
        --workdir=workdirs/ldm_demo_diffusion \
        --config.autoencoder.workdir=workdirs/ldm_demo_autoencoder
"""

from ldm_jax import config_lib

DEMO = dict(slices_per_head=8, num_copies=1, num_neighbours=1, num_other=1,
            heldout_per_head=0)
IMAGE_SIZE = (68, 56)


def get_config():
  c = config_lib.diffusion_config()
  c.workdir = "workdirs/ldm_demo_diffusion"
  c.data = config_lib.data_config("demo", part="real")
  c.data.demo.update(DEMO)
  c.data.image_size = IMAGE_SIZE
  c.autoencoder.workdir = "workdirs/ldm_demo_autoencoder"
  c.latent.scale_factor = 0.0
  c.model.name = "DiffusionModelUNet_tiny"
  c.cond.kind = "covariates"
  c.duplication.mode = "low"
  c.schedule.num_steps = 100
  c.schedule.beta_start = 0.015
  c.schedule.beta_end = 0.205
  c.optim.learning_rate = 2e-3
  c.train.batch_size = 16
  c.train.num_epochs = 0
  c.train.num_steps = 2500
  c.train.ema_decay = 0.99
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 2500
  c.generate.num_samples = 4
  c.generate.batch_size = 32
  return c
