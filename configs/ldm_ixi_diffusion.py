"""LDM second stage on IXI with the paper's settings, and its generation job.

MONAI's DiffusionModelUNet (channels (256, 512, 768), attention at levels 2 and 3)
conditioned by cross-attention on age, sex, sequence and CSF/WM/GM fractions (a CSV, see
ldm_jax/input_pipeline.py), on latents of the trained autoencoder padded to 3 x 36 x 28;
scaled-linear 1000-step schedule; AdamW 2.5e-5, batch 8; duplication none (set low or high
for the memorization-prone models); generation: 30 DDIM samples (50 steps, eta 0) per
training record.

    python -m ldm_jax.main --config=configs/ldm_ixi_diffusion.py \
        --workdir=workdirs/ldm_ixi_diffusion --config.data.train.root=/data/IXI \
        --config.data.covariates_csv=/data/IXI/covariates.csv \
        --config.autoencoder.workdir=workdirs/ldm_ixi_autoencoder \
        --config.duplication.mode=high
    python -m ldm_jax.main --config=configs/ldm_ixi_diffusion.py --mode=generate \
        --workdir=workdirs/ldm_ixi_diffusion --config.data.train.root=/data/IXI \
        --config.data.covariates_csv=/data/IXI/covariates.csv
"""

from ldm_jax import config_lib


def get_config():
  c = config_lib.diffusion_config()
  c.workdir = "workdirs/ldm_ixi_diffusion"
  c.data = config_lib.data_config("volumes", "", layout="ixi")
  c.data.download_hint = config_lib.IXI_HINT
  c.autoencoder.workdir = "workdirs/ldm_ixi_autoencoder"
  c.cond.kind = "covariates"
  return c
