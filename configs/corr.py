"""DeepSSIM on CoRR with the paper's settings (ConvNeXt-Base, batch 32, 40 epochs).

    python -m deepssim_jax.main --config=configs/corr.py --workdir=workdirs/corr \
        --config.data.real.root=/data/CoRR --config.data.synth.root=/data/corr_generated \
        --config.model.init_from=/weights/convnext_base-6075fbad.pth

Paper semantics and ImageNet init as in configs/ixi.py.
"""

from deepssim_jax import config_lib

HINT = """Download the CoRR anatomical scans from the FCP/INDI CoRR release
(http://fcon_1000.projects.nitrc.org/indi/CoRR/html/ , e.g. with `aws s3 sync --no-sign-request
s3://fcp-indi/data/Projects/CoRR/RawDataBIDS/ /data/CoRR/`), keeping either the layout
RawData/<site>/<subid>/session_N/anat_K/anat.nii.gz or the BIDS layout
<site>/sub-<id>/ses-<N>/anat/*_T1w.nii.gz, and pass the top folder as
--config.data.real.root=/data/CoRR.
Synthetic images (optional): ldm_jax's generation output, --config.data.synth.root=..."""


def get_config():
  c = config_lib.paper_semantics(config_lib.base_config(), stochastic_depth=0.5)
  c.workdir = "workdirs/corr"
  c.data.real = config_lib.source_config("volumes", "", layout="corr", sequences=("T1",))
  c.data.synth = config_lib.source_config("reference", "", part="generated")
  c.data.download_hint = HINT + "\n" + config_lib.IMAGENET_HINT
  return c
