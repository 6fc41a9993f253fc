"""DeepSSIM on IXI with the paper's settings (ConvNeXt-Base, batch 32, 40 epochs).

Real images: axial slices of the IXI T1/T2/PD volumes; synthetic images: the reference
layout written by ldm_jax's generation job (or any <uid>/training.png, <uid>/gen-<i>.png
folder). Without a synthetic set, pairs are drawn within the real set.

    python -m deepssim_jax.main --config=configs/ixi.py --workdir=workdirs/ixi \
        --config.data.real.root=/data/IXI --config.data.synth.root=/data/ixi_generated
"""

from deepssim_jax import config_lib

HINT = """Download the IXI T1, T2 and PD images (IXI-T1.tar, IXI-T2.tar, IXI-PD.tar) and,
optionally, the demographics IXI.xls from https://brain-development.org/ixi-dataset/ ,
extract all .nii.gz files into one folder (names like IXI002-Guys-0828-T1.nii.gz, with
IXI.xls beside them) and pass it as --config.data.real.root=/path/to/IXI.
Synthetic images (optional): run ldm_jax's generation job (configs/ldm_ixi_diffusion.py)
and pass its output folder as --config.data.synth.root=/path/to/generated."""


def get_config():
  c = config_lib.base_config()
  c.workdir = "workdirs/ixi"
  c.data.real = config_lib.source_config("volumes", "", layout="ixi")
  c.data.synth = config_lib.source_config("reference", "", part="generated")
  c.data.download_hint = HINT
  return c
