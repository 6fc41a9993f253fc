"""DeepSSIM on IXI with the paper's settings (ConvNeXt-Base, batch 32, 40 epochs).

Real images: axial slices of the IXI T1/T2/PD volumes; synthetic images: the reference
layout written by ldm_jax's generation job (or any <uid>/training.png, <uid>/gen-<i>.png
folder). Without a synthetic set, pairs are drawn within the real set.

    python -m deepssim_jax.main --config=configs/ixi.py --workdir=workdirs/ixi \
        --config.data.real.root=/data/IXI --config.data.synth.root=/data/ixi_generated \
        --config.model.init_from=/weights/convnext_base-6075fbad.pth

The paper's training semantics (config_lib.paper_semantics): ImageNet-1k init with the stem
and first two stages frozen, stochastic depth 0.5, no z-scoring after augmentation,
augmented validation pairs, one forward pass per branch. Without model.init_from the run
stops and says where to get torchvision's weights (frozen random layers are refused);
--config.model.freeze=reference reproduces the reference's own freezing rule.
"""

from deepssim_jax import config_lib


def get_config():
  c = config_lib.paper_semantics(config_lib.base_config(), stochastic_depth=0.5)
  c.workdir = "workdirs/ixi"
  c.data.real = config_lib.source_config("volumes", "", layout="ixi")
  c.data.synth = config_lib.source_config("reference", "", part="generated")
  c.data.download_hint = config_lib.IXI_HINT + "\n" + config_lib.IMAGENET_HINT
  return c
