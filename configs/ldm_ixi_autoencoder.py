"""LDM first stage on IXI with the paper's settings: KL autoencoder + patch GAN.

MONAI's AutoencoderKL (channels (64, 128, 128), latent 3) and PatchDiscriminator (3 layers,
32 channels); L1 + 0.1 perceptual (structural SSIM term unless a feature network is given)
+ 1e-6 KL + 0.125 least-squares adversarial; Adam 1e-4; 8 images per step, 16 per update.

    python -m ldm_jax.main --config=configs/ldm_ixi_autoencoder.py \
        --workdir=workdirs/ldm_ixi_autoencoder --config.data.train.root=/data/IXI
"""

from ldm_jax import config_lib


def get_config():
  c = config_lib.autoencoder_config()
  c.workdir = "workdirs/ldm_ixi_autoencoder"
  c.data = config_lib.data_config("volumes", "", layout="ixi")
  c.data.download_hint = config_lib.IXI_HINT
  return c
