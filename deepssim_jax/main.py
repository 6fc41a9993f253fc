"""Entrypoint: `python -m deepssim_jax.main --config=configs/<x>.py --workdir=DIR [--mode=...]`.

Modes: train (default: data -> pair table -> training -> evaluation on labelled test pairs
when there are any), pairs (build the pair table only), embed (image sets -> embedding
stores), match (top-k training neighbours of every synthetic image), evaluate (score
labelled pairs with the configured metrics and checkpoints). See jobs.MODES.

Before any work the config is checked (deepssim_jax.validate); every mode then runs holding
the workdir's lock, after the temporaries of killed jobs are removed (deepssim_jax.workdir).
Errors meant for users print one line `error: ...` and exit with status 2 (deepssim_jax.cli;
--verbose or DEEPSSIM_VERBOSE=1 adds the traceback).
"""

import jax
from absl import app, logging

from deepssim_jax import cli, jobs, validate, workdir as workdir_lib

_FLAGS = cli.run_flags()


def run() -> dict:
  config = cli.start_run("configs/demo.py")
  mode = _FLAGS.mode.value or "train"
  if mode not in jobs.MODES:
    raise validate.ConfigError(f"--mode must be one of {sorted(jobs.MODES)}, got {mode!r}")
  validate.check_deepssim(config, mode, jax.device_count())  # before anything is written
  workdir = _FLAGS.workdir.value or config.workdir
  with workdir_lib.locked(workdir, mode):
    logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    return jobs.MODES[mode](config, workdir)


def main(argv):
  del argv
  cli.run_guarded(run, verbose=cli.verbose_requested(cli.VERBOSE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
