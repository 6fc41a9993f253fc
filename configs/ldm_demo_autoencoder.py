"""LDM first stage on the embedded demo slices: tiny networks, minutes on 2 CPU cores.

32 real slices (8 per head of four vendored volumes) at 68 x 56 (half the reference's
136 x 112, a quarter of the compute), AutoencoderKL_tiny (latents 3 x 17 x 14),
L1 + SSIM + KL at a higher learning rate, and no adversarial term: at this size and
learning rate the patch GAN's gradients tore the reconstructions apart within a few hundred
steps (L1 0.15 and rising at step 500, against 0.05 without it), while the demo needs a
sharp-enough first stage for the diffusion model's samples to look like slices. The
reference's recipe (adversarial weight 0.125, 16 x 2 images per update) is
configs/ldm_ixi_autoencoder.py.

    python -m ldm_jax.main --config=configs/ldm_demo_autoencoder.py \
        --workdir=workdirs/ldm_demo_autoencoder
"""

from ldm_jax import config_lib

DEMO = dict(slices_per_head=8, num_copies=1, num_neighbours=1, num_other=1,
            heldout_per_head=0)
IMAGE_SIZE = (68, 56)


def get_config():
  c = config_lib.autoencoder_config()
  c.workdir = "workdirs/ldm_demo_autoencoder"
  c.data = config_lib.data_config("demo", part="real")
  c.data.demo.update(DEMO)
  c.data.image_size = IMAGE_SIZE
  c.model.name = "AutoencoderKL_tiny"
  c.disc.name = "PatchDiscriminator_tiny"
  c.optim.learning_rate = 1e-3
  c.optim.d_learning_rate = 1e-3
  c.loss.adv_weight = 0.0
  c.train.batch_size = 8
  c.train.effective_batch_size = 16
  c.train.num_epochs = 0
  c.train.num_steps = 800
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.train.sample_every_steps = 200
  return c
