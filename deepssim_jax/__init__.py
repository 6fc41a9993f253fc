"""DeepSSIM in JAX/Flax: a learned, misalignment-robust SSIM embedding for memorization audits."""

__version__ = "0.1.0"
