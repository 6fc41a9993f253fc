"""Entrypoint: `python -m deepssim_jax.main --config=configs/<x>.py --workdir=DIR [--mode=...]`.

Modes: train (default: data -> pair table -> training -> evaluation on labelled test pairs
when there are any), pairs (build the pair table only), embed (image sets -> embedding
stores), match (top-k training neighbours of every synthetic image), evaluate (score
labelled pairs with the configured metrics and checkpoints). See jobs.MODES.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepssim_jax import jobs, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go "
                               "(default: config.workdir).")
_MODE = flags.DEFINE_enum("mode", "train", sorted(jobs.MODES), "Which job to run.")
_COORD = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator "
                             "host:port (multi-process runs; auto-detected on SLURM/TPU).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def main(argv):
  del argv
  flags.mark_flags_as_required(["config"])
  parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  parallel.setup_logging()
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  jobs.MODES[_MODE.value](config, workdir)


if __name__ == "__main__":
  app.run(main)
