"""ldm_jax: the latent diffusion model (KL autoencoder + patch GAN, UNet, DDPM/DDIM) that
DeepSSIM audits."""

__version__ = "0.1.0"
