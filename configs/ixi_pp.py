"""DeepSSIM++ on IXI: the reference's newer model and training recipe.

ConvNeXt-Tiny from torchvision's ImageNet weights with the stem and first stage frozen, a
learnable GeM (p = 3) on each of the four stages, concatenated (1440) -> LayerNorm ->
Dense 848 -> GELU -> Dropout 0.1 -> Dense 256; AdamW lr 1e-3 with layer-wise decay 0.3
(head at 1e-3, stage 4 at 3e-4, stage 3 at 9e-5, stage 2 at 2.7e-5), weight decay 1e-3,
clipping 1.0, batch 128, 65 epochs, bf16 compute (the reference: fp16 autocast).

    python -m deepssim_jax.main --config=configs/ixi_pp.py --workdir=workdirs/ixi_pp \
        --config.data.real.root=/data/IXI --config.data.synth.root=/data/ixi_generated \
        --config.model.init_from=/weights/convnext_tiny-983f1562.pth
"""

from deepssim_jax import config_lib


def get_config():
  # torchvision's convnext_tiny default stochastic depth is 0.1.
  c = config_lib.paper_semantics(config_lib.base_config(), stochastic_depth=0.1)
  c.workdir = "workdirs/ixi_pp"
  c.data.real = config_lib.source_config("volumes", "", layout="ixi")
  c.data.synth = config_lib.source_config("reference", "", part="generated")
  c.data.download_hint = config_lib.IXI_HINT + "\n" + config_lib.IMAGENET_HINT
  c.model.name = "convnext_tiny"
  c.model.head = "gem"
  c.model.num_frozen_stages = 1
  c.model.overrides.update(dict(hidden_dim=0, dropout=0.1))
  c.model.dtype = "bfloat16"
  c.optim.layer_decay = 0.3
  c.train.batch_size = 128
  c.train.num_epochs = 65
  return c
