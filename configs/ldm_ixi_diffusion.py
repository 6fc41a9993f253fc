"""LDM second stage on IXI with the paper's settings, and its generation job.

MONAI's DiffusionModelUNet (channels (256, 512, 768), attention at levels 2 and 3)
conditioned by cross-attention on age, sex, sequence and CSF/WM/GM fractions (a CSV, see
ldm_jax/input_pipeline.py), on the posterior means (scale factor 1) of the best-validation
autoencoder, padded symmetrically to 3 x 36 x 28; scaled-linear 1000-step schedule; AdamW
2.5e-5, batch 8; duplication none (set low or high for the memorization-prone models); 10%
of the subjects held out (the same as the autoencoder's) for the per-epoch validation loss;
generation from the best-validation UNet: 30 DDIM samples (50 steps, eta 0) per training
record. For the reference's text conditioning set --config.cond.kind=text and
--config.data.text_csv=captions.csv (columns key,caption_emb_path).

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
  c.data.valid_fraction = 0.1
  c.autoencoder.checkpoint = "best"
  c.generate.checkpoint = "best"
  return c
