"""DeepSSIM in JAX/Flax: a learned, misalignment-robust SSIM embedding for memorization audits."""

__version__ = "0.1.0"

_API = ("load", "classify", "Model", "read_images")


def __getattr__(name):
  """`deepssim_jax.load`, `deepssim_jax.classify`, ...: the API (deepssim_jax.api), imported
  on first use so that `import deepssim_jax.<module>` stays light."""
  if name in _API:
    from deepssim_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'deepssim_jax' has no attribute {name!r}")
