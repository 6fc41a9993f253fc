"""Reading images for DeepSSIM: MRI volumes, PNG layouts, image banks and the demo set.

An image source is a random-access object with `keys` (unique, stable order), `__len__`,
`__getitem__(i) -> float32 (H, W)` z-scored image and `meta` (dict of per-image numpy
columns); sources are picklable and thread-safe, so grain can read them in workers.
`load_all` materialises one as a bank (dict keys / images / meta), which `save_bank` /
`load_bank` cache as an .npz.

* volumes: axial slices of NIfTI volumes (IXI, CoRR, any folder), RAS+, physical aspect kept.
* images: PNG sources (the reference `<uid>/training.png`, `<uid>/gen-<i>.png` layout, a CSV
  manifest, a folder), resampling, z-scoring, banks, write_png.
* demo: the embedded demo set built from the vendored volumes in data/mri.
"""

from deepssim_jax.data.images import PngSource
from deepssim_jax.data.images import find_reference_layout
from deepssim_jax.data.images import folder_source
from deepssim_jax.data.images import load_all
from deepssim_jax.data.images import load_bank
from deepssim_jax.data.images import manifest_source
from deepssim_jax.data.images import save_bank
from deepssim_jax.data.images import write_png
from deepssim_jax.data.volumes import LAYOUTS
from deepssim_jax.data.volumes import VolumeSliceSource
from deepssim_jax.data.volumes import find_volumes
from deepssim_jax.data.demo import demo_sets
from deepssim_jax.data.demo import write_demo_layout
