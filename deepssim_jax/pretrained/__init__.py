"""Exported DeepSSIM models: one .npz file per model, shipped in this folder or anywhere.

A file holds the weights (`variables/<path>` arrays) and one JSON string `meta`: the
training config (model, image size, band), the checkpoint step, where it came from and the
sha256 of its weights. It needs no orbax, no workdir and no network to load:
`deepssim_jax.load("builtin")` or `deepssim_jax.load("path/model.npz")`.

    python -m deepssim_jax.pretrained --workdir=workdirs/builtin [--checkpoint=best] \
        [--out=deepssim_jax/pretrained/builtin.npz]

writes the file atomically. Several --workdir flags join their runs into one ensemble
(models.Ensemble: the mean of their cosines), e.g. one recipe trained from two seeds.
BUILTIN is the model of configs/builtin.py (MODEL_CARD.md).
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from deepssim_jax import fileio

BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin.npz")
PREFIX = "variables/"
FORMAT_VERSION = 1


def weights_sha256(flat: dict) -> str:
  """sha256 over the sorted (path, dtype, shape, bytes) of every array."""
  h = hashlib.sha256()
  for k in sorted(flat):
    a = np.ascontiguousarray(flat[k])
    h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# Config sections that must agree for runs to be joined into one ensemble (the model the
# members build and the images they read). model.ensemble is left out: a trained run's is
# always 1, and runs saved before the field existed lack it.
_ENSEMBLE_SAME = ("model", "data.image_size", "data.real.band")


def _section(config, dotted: str):
  node = config
  for name in dotted.split("."):
    node = node.get(name) if hasattr(node, "get") else None
  node = node.to_dict() if hasattr(node, "to_dict") else node
  if dotted == "model" and isinstance(node, dict):
    node = {k: v for k, v in node.items() if k != "ensemble"}
  return json.dumps(node, sort_keys=True, default=str)


def export(workdirs, which: str = "best", out: str = BUILTIN, step=None) -> dict:
  """Writes the checkpoint `which` (best | latest, optional step) of a training workdir as
  one .npz (module docstring), or of several workdirs as one ensemble (models.Ensemble:
  the mean of their cosines; their model, image size and band must agree). Returns its
  meta.

  Raises:
    fileio.InputError: workdirs that disagree on the model or the images it reads.
  """
  from deepssim_jax import runs, train  # pylint: disable=g-import-not-at-top
  workdirs = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
  members = []
  for workdir in workdirs:
    config = runs.load_config(workdir)
    _, variables, member_step = train.restore_model(workdir, which, step, config=config)
    members.append((workdir, config, jax.device_get(variables), int(member_step)))
  config = members[0][1]
  for workdir, other, _, _ in members[1:]:
    for key in _ENSEMBLE_SAME:
      if _section(other, key) != _section(config, key):
        raise fileio.InputError(f"{workdir}: config.{key} differs from {workdirs[0]}'s; an "
                                "ensemble's members must share the model and its images")
  if len(members) == 1:
    variables = members[0][2]
  else:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.ensemble = len(members)
    variables = {col: {f"members_{i}": v[col] for i, (_, _, v, _) in enumerate(members)}
                 for col in members[0][2]}
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(variables).items()}
  sources = [f"{os.path.abspath(w)}:{which}" for w, _, _, _ in members]
  meta = {"format_version": FORMAT_VERSION, "config": json.loads(config.to_json_best_effort()),
          "step": members[0][3], "source": sources[0] if len(members) == 1 else sources,
          "weights_sha256": weights_sha256(flat)}
  if len(members) > 1:
    meta["members"] = [{"source": src, "step": st, "seed": c.get("seed")}
                       for src, (_, c, _, st) in zip(sources, members)]
  arrays = {PREFIX + k: v for k, v in flat.items()}
  with fileio.atomic_open(out, "wb") as f:
    np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), **arrays)
  return meta


def load(path: str = BUILTIN):
  """(config, model, variables, step) of an exported model file.

  Raises:
    fileio.InputError: a missing or unreadable file, a file that is not an exported model, or
      weights whose sha256 differs from the one recorded (a damaged file).
  """
  from deepssim_jax import train  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    hint = (" (the built-in model ships with the package: reinstall it, or export one with "
            "python -m deepssim_jax.pretrained)" if path == BUILTIN else "")
    raise fileio.InputError(f"{path}: model file not found{hint}")
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"])) if "meta" in z.files else None
      flat = {k[len(PREFIX):]: z[k] for k in z.files if k.startswith(PREFIX)}
  except (OSError, ValueError, json.JSONDecodeError) as e:
    raise fileio.InputError(f"{path}: not a readable model file ({e})") from None
  if meta is None or not flat:
    raise fileio.InputError(f"{path}: not an exported DeepSSIM model (no meta / variables)")
  if meta.get("format_version") != FORMAT_VERSION:
    raise fileio.InputError(f"{path}: model file format {meta.get('format_version')!r}, this "
                        f"version reads {FORMAT_VERSION}")
  if weights_sha256(flat) != meta["weights_sha256"]:
    raise fileio.InputError(f"{path}: weights do not match their recorded sha256 (damaged file)")
  config = ml_collections.ConfigDict(meta["config"])
  model = train.model_from_config(config)
  variables = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                            for k, v in flat.items()})
  shape = tuple(config.data.image_size)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                               train=False))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(expected).items()}
  have = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:5]
    raise fileio.InputError(f"{path}: weights do not fit the model its config describes "
                        f"(first differences: {diff})")
  return config, model, variables, int(meta["step"])
