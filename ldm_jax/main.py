"""Entrypoint: `python -m ldm_jax.main --config=configs/ldm_<x>.py --workdir=DIR [--mode=...]`.

Modes: autoencoder (train the KL autoencoder + GAN), diffusion (train the UNet on the frozen
autoencoder's latents), generate (write <uid>/training.png, <uid>/gen-<i>.png for every
training record of a diffusion run), nearest (each generated sample's most similar training
slice by SSIM, ldm_jax/nearest.py). Without --mode, the config's `mode` field decides.

As deepssim_jax.main: the config is checked before any work (deepssim_jax.validate), every
mode runs holding the workdir's lock after the temporaries of killed jobs are removed
(deepssim_jax.workdir), and errors meant for users print one line and exit with status 2
(deepssim_jax.cli; --verbose or DEEPSSIM_VERBOSE=1 adds the traceback).
"""

import jax
from absl import app, logging

from deepssim_jax import cli, fileio, validate, workdir as workdir_lib
from ldm_jax import generate, nearest, train_autoencoder, train_diffusion

MODES = {"autoencoder": train_autoencoder.train_and_evaluate,
         "diffusion": train_diffusion.train,
         "generate": generate.generate,
         "nearest": nearest.nearest}

_FLAGS = cli.run_flags()


def check_data(config) -> None:
  """Stops with download instructions when the training images are missing."""
  spec = config.data.train
  if spec.kind != "demo":
    fileio.require_path(spec.root, f"training images ({spec.kind})",
                        config.data.get("download_hint", ""))


def run():
  config = cli.start_run("configs/ldm_demo_autoencoder.py")
  mode = _FLAGS.mode.value or config.get("mode", "")
  if mode not in MODES:
    raise validate.ConfigError(f"--mode must be one of {sorted(MODES)} (the config has "
                               f"mode={mode!r})")
  validate.check_ldm(config, mode, jax.device_count())  # before anything is written
  check_data(config)
  workdir = _FLAGS.workdir.value or config.workdir
  with workdir_lib.locked(workdir, mode):
    logging.info("JAX %s: %d process(es), %d device(s): %s; mode %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform, mode)
    return MODES[mode](config, workdir)


def main(argv):
  del argv
  cli.run_guarded(run, verbose=cli.verbose_requested(cli.VERBOSE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
