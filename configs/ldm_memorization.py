"""A diffusion model that memorizes: pixel space, 4 embedded slices at 16 x 16, over-trained.

The end-to-end memorization check (tests/test_ldm_memorization.py) and a quick way to see
memorization happen: no autoencoder (autoencoder.kind "identity"), a tiny UNet conditioned
on each slice's synthetic covariates, a 100-step schedule (the reference's end point
alpha-bar ~ 1e-4 reached in 100 steps) so that every timestep is seen often, and a high
learning rate. After train.num_steps the generated samples are near-copies of their
training slices (nearest-neighbour SSIM > 0.85); stopped after 20 steps they are noise.

    python -m ldm_jax.main --config=configs/ldm_memorization.py --workdir=workdirs/ldm_mem
    python -m ldm_jax.main --config=configs/ldm_memorization.py --workdir=workdirs/ldm_mem \
        --mode=generate
"""

from ldm_jax import config_lib


def get_config():
  c = config_lib.diffusion_config()
  c.workdir = "workdirs/ldm_memorization"
  c.data = config_lib.data_config("demo", part="real")
  c.data.image_size = (16, 16)
  c.data.demo.update(dict(slices_per_head=1, num_copies=1, num_neighbours=1, num_other=1,
                          heldout_per_head=0))
  c.data.intensity = "zscore"     # pixel-space diffusion wants unit-variance data
  c.autoencoder.kind = "identity"
  c.latent.scale_factor = 1.0
  c.model.name = "DiffusionModelUNet_tiny"
  c.cond.kind = "covariates"
  c.schedule.num_steps = 100
  c.schedule.beta_start = 0.015
  c.schedule.beta_end = 0.205
  c.optim.learning_rate = 2e-3
  c.train.batch_size = 32
  c.train.num_epochs = 0
  c.train.num_steps = 800
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 20
  c.train.sample_every_steps = 0
  c.sample.num_inference_steps = 20
  c.generate.num_samples = 2
  c.generate.batch_size = 8
  return c
