"""LDM first stage on IXI with the paper's settings: KL autoencoder + patch GAN.

MONAI's AutoencoderKL (channels (64, 128, 128), latent 3) and PatchDiscriminator (3 layers,
32 channels) on slices min-max scaled to [0, 1]; L1 + 0.1 perceptual (structural SSIM term
unless LPIPS-squeeze weights are given, see README) + 1e-6 KL + 0.125 least-squares
adversarial; Adam 1e-4; 16 images per step, 32 per update (the reference script's
accumulation); 10% of the subjects held out for the per-epoch validation loss and the best
checkpoint (<workdir>/best).

    python -m ldm_jax.main --config=configs/ldm_ixi_autoencoder.py \
        --workdir=workdirs/ldm_ixi_autoencoder --config.data.train.root=/data/IXI
"""

from ldm_jax import config_lib


def get_config():
  c = config_lib.autoencoder_config()
  c.workdir = "workdirs/ldm_ixi_autoencoder"
  c.data = config_lib.data_config("volumes", "", layout="ixi")
  c.data.download_hint = config_lib.IXI_HINT
  c.data.valid_fraction = 0.1
  return c
