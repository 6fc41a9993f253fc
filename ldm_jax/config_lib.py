"""Base configs of the latent diffusion model, with the reference's settings as defaults.

The reference's semantics (brAIn-science/DeepSSIM scripts/ldm_*.py) are the defaults, each
a field with our alternative kept as an option: images min-max scaled to [0, 1]
(data.intensity, or "zscore" as DeepSSIM reads them), posterior-mean latents
(latent.sample), latent scale factor 1 (latent.scale_factor, 0: 1 / std), symmetric
padding to 3 x 36 x 28 (latent.pad_mode, or "end"), the autoencoder's 16 images per
micro-step and 2 micro-steps per update (the reference's script loads batches of
--batch_size 16 and accumulates 16 / --max_batch_size 8 = 2 of them: 32 images per
update). Validation (data.valid_fraction: the reference reads a split column) and the
best checkpoints, EMA weights (train.ema_decay) and bfloat16 compute
(train.mixed_precision; the reference uses torch autocast) are switches.

configs/ldm_*.py call `autoencoder_config()` or `diffusion_config()` and override a few
fields (STYLE: every number lives in a config). Sections: data, model (+ disc, loss) or
autoencoder, latent, model, cond, schedule, duplication, sample, generate; optim; train.
"""

import ml_collections

from deepssim_jax import config_lib as deepssim_config

IXI_HINT = """Download the IXI T1, T2 and PD images (IXI-T1.tar, IXI-T2.tar, IXI-PD.tar) and
the demographics IXI.xls from https://brain-development.org/ixi-dataset/ , extract all
.nii.gz files into one folder (names like IXI002-Guys-0828-T1.nii.gz, IXI.xls beside them)
and pass it as --config.data.train.root=/path/to/IXI."""


def data_config(kind: str = "demo", root: str = "", **kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.image_size = (136, 112)       # (H, W); the autoencoder needs multiples of 4
  c.train = deepssim_config.source_config(kind, root, **kw)  # the training images
  c.demo = ml_collections.ConfigDict()  # demo_sets() arguments (kind 'demo')
  c.download_hint = ""
  c.num_threads = 4               # image reading threads when building the cache
  c.max_images = 0                # >0: keep only the first that many images
  c.covariates_csv = ""           # key,age,sex,sequence,csf,wm,gm (see input_pipeline)
  c.text_csv = ""                 # key,caption_emb_path (.npz, array "data"): cond.kind text
  c.intensity = "minmax"          # minmax: [0, 1] per image (reference) | zscore
  c.valid_fraction = 0.0          # >0: subjects held out for the validation loss + best
  return c


def autoencoder_config() -> ml_collections.ConfigDict:
  """KL autoencoder + patch GAN (the reference's LDM, brAIn-science/DeepSSIM)."""
  c = ml_collections.ConfigDict()
  c.mode = "autoencoder"
  c.seed = 42
  c.workdir = "workdirs/ldm_autoencoder"
  c.data = data_config()

  c.model = ml_collections.ConfigDict({"name": "AutoencoderKL_ref",
                                       "overrides": ml_collections.ConfigDict()})
  c.disc = ml_collections.ConfigDict({"name": "PatchDiscriminator_ref",
                                      "overrides": ml_collections.ConfigDict()})
  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0
  c.loss.perceptual = "ssim"      # ssim | lpips_squeeze (perceptual_kwargs.weights) | none
  c.loss.perceptual_kwargs = ml_collections.ConfigDict({"weights": ""})  # .npz (perceptual.py)
  c.loss.perceptual_weight = 0.1
  c.loss.kl_weight = 1e-6
  c.loss.adv_weight = 0.125
  c.loss.adv_warmup_steps = 0     # the reference: no warm-up; MONAI tutorials use a few epochs

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4    # autoencoder (Adam)
  c.optim.d_learning_rate = 1e-4  # discriminator (Adam)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16         # images per (micro-)step, global (reference: 16)
  c.train.effective_batch_size = 32  # per update: the reference accumulates 2 batches of 16
  c.train.num_steps = 0           # 0: from num_epochs
  c.train.num_epochs = 100
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 1000
  c.train.keep_checkpoints = 2
  c.train.num_grid_images = 8
  c.train.valid_every_steps = 0   # with data.valid_fraction > 0; 0: every epoch
  c.train.mixed_precision = False  # bfloat16 compute (the reference: torch autocast)
  return c


def diffusion_config() -> ml_collections.ConfigDict:
  """Diffusion UNet on the frozen autoencoder's latents, and generation (the reference's LDM)."""
  c = ml_collections.ConfigDict()
  c.mode = "diffusion"
  c.seed = 42
  c.workdir = "workdirs/ldm_diffusion"
  c.data = data_config()

  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.kind = "kl"       # kl (a trained run) | identity (pixel space)
  c.autoencoder.workdir = "workdirs/ldm_autoencoder"
  c.autoencoder.checkpoint = "latest"  # latest | best (its best validation loss)

  c.latent = ml_collections.ConfigDict()
  c.latent.pad_multiple = 4       # 34 x 28 -> 36 x 28
  c.latent.pad_mode = "symmetric"  # symmetric (MONAI DivisiblePad, reference) | end
  c.latent.scale_factor = 1.0     # reference: 1; 0: 1 / std of the cached latents (MONAI)
  c.latent.sample = False         # False: posterior mean (reference); True: mu + sigma eps

  c.model = ml_collections.ConfigDict({"name": "DiffusionModelUNet_ref",
                                       "overrides": ml_collections.ConfigDict()})
  c.cond = ml_collections.ConfigDict()
  c.cond.kind = "none"            # none | covariates | text (data.text_csv)
  c.cond.sequences = ("T1", "T2", "PD")  # sequence names -> 0, 1, 2
  # context = (covariate - offset) / scale, columns age, sex, sequence, csf, wm, gm
  c.cond.offset = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
  c.cond.scale = (100.0, 1.0, 2.0, 1.0, 1.0, 1.0)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.num_steps = 1000
  c.schedule.beta_start = 0.0015
  c.schedule.beta_end = 0.0205
  c.schedule.kind = "scaled_linear"

  c.duplication = ml_collections.ConfigDict()
  c.duplication.mode = "none"     # none | low | high
  c.duplication.ranges = ml_collections.ConfigDict({"none": (1, 1), "low": (1, 4),
                                                    "high": (1, 14)})
  c.duplication.seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2.5e-5  # AdamW
  c.optim.schedule = "constant"   # constant (reference) | cosine (decay to 0 over the run)
  c.optim.weight_decay = 0.01     # torch.optim.AdamW's default
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8
  c.train.num_steps = 0           # 0: from num_epochs (over the duplicated list)
  c.train.num_epochs = 150
  c.train.encode_batch_size = 32
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.sample_every_steps = 5000  # 0: no sample grids
  c.train.keep_checkpoints = 2
  c.train.num_grid_samples = 8
  c.train.valid_every_steps = 0   # with data.valid_fraction > 0; 0: every epoch
  c.train.ema_decay = 0.0         # >0: EMA of the UNet weights (used to sample; reference: 0)
  # bfloat16 UNet compute, training and DDIM sampling (the reference: torch autocast)
  c.train.mixed_precision = False

  c.sample = ml_collections.ConfigDict()
  c.sample.num_inference_steps = 50
  c.sample.eta = 0.0
  c.sample.seed = 0

  c.generate = ml_collections.ConfigDict()
  c.generate.num_samples = 30     # per training record
  c.generate.batch_size = 64      # global, across records
  c.generate.seed = 0
  c.generate.out_dir = ""         # default <workdir>/generated
  c.generate.checkpoint = "latest"  # latest | best (lowest validation loss)
  return c
