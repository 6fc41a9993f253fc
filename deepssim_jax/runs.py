"""What every run of both packages shares (deepssim_jax training, the ldm_jax trainers):
its metrics log, its saved config, and restoring checkpoints onto any mesh.

* `MetricsLog`: metrics rows in memory, mirrored to <workdir>/metrics.csv (written
  atomically) and TensorBoard; a resumed run keeps the rows up to its checkpoint.
* `save_config` / `load_config`: <workdir>/config.json, what evaluation rebuilds a model from.
* `abstract_like`: the restore target of an orbax checkpoint, replicated on the current mesh.
"""

import json
import os

import jax
import ml_collections

from deepssim_jax import fileio, parallel


class MetricsLog:
  """Metrics rows kept in memory and mirrored to metrics.csv (atomic) and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, "metrics.csv")
    self.rows = []
    if os.path.exists(self.path):  # keep what the interrupted run logged up to its checkpoint
      t = fileio.read_csv(self.path, required=["step"])
      keys = list(t)
      for i in range(len(t["step"])):
        row = {k: t[k][i] for k in keys}
        if int(row["step"]) <= resume_step:
          self.rows.append(row)
    self.writer = None
    if parallel.is_main_process():
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not parallel.is_main_process():
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self.rows.append(row)
    for k, v in metrics.items():
      self.writer.add_scalar(k, float(v), step)
    self.writer.flush()
    cols = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})
    fileio.write_csv(self.path, cols, ([r.get(c, "") for c in cols] for r in self.rows))

  def close(self):
    if self.writer is not None:
      self.writer.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/config.json (process 0). Trainers call it once the run is accepted
  (after their config and resume checks), so a refused run leaves it as it was."""
  if parallel.is_main_process():
    fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """<workdir>/config.json as a ConfigDict.

  Raises:
    InputError: the file is missing (not a training workdir).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise fileio.InputError(f"{path}: missing; every training workdir (deepssim_jax or ldm_jax) "
                        "has its config beside the checkpoints")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def abstract_like(tree, mesh):
  """ShapeDtypeStructs with a replicated sharding: a checkpoint restores on any mesh."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
