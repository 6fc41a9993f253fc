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
from absl import app, flags, logging
from ml_collections import config_flags

from deepssim_jax import cli, jobs, parallel, validate, workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go "
                               "(default: config.workdir).")
_MODE = flags.DEFINE_enum("mode", "train", sorted(jobs.MODES), "Which job to run.")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator "
                             "host:port (multi-process runs; auto-detected on SLURM/TPU).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Tracebacks for errors meant for users too "
                             f"(or {cli.VERBOSE_ENV}=1).")


def run() -> dict:
  try:
    parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  except ValueError as e:  # incomplete multi-process settings
    raise validate.ConfigError(str(e)) from e
  parallel.setup_logging()
  config = _CONFIG.value
  if config is None:
    raise validate.ConfigError("--config is required, e.g. --config=configs/demo.py")
  mode = _MODE.value
  validate.check_deepssim(config, mode, jax.device_count())  # before anything is written
  workdir = _WORKDIR.value or config.workdir
  with workdir_lib.locked(workdir, mode):
    logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    return jobs.MODES[mode](config, workdir)


def main(argv):
  del argv
  cli.run_guarded(run, verbose=cli.verbose_requested(_VERBOSE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
