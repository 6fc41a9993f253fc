"""Foreign weight files -> our variables, and a checkpoint every mode reads.

Reads torchvision `.pth` (torch.load(weights_only=True)), timm `.safetensors` (the
safetensors package: no torch), the reference's TorchScript `best_model_jit.pt` or a state
dict of it, and DeepSSIM++'s; maps their keys with the tables of deepssim_jax/convnext_keys.py
(the formats are listed there), checks the result against the model's variables (`fill`:
missing, unexpected and mis-shaped keys by name) and writes a workdir that every mode reads
as `<folder>:best` (the converter CLI).

TorchScript runs code when loaded: it is read only with `torchscript=True`
(`--torchscript` on the command line). torch is imported only inside the readers.

    python -m deepssim_jax.convert --from=best_model_jit.pt --torchscript --to=models/ref
    python -m deepssim_jax.main --config=configs/ixi.py --mode=evaluate \
        --config.eval.metrics='("deepssim@models/ref:best",)' ...
"""

import hashlib
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from deepssim_jax import config_lib, convnext_keys, fileio, models, runs

# ----------------------------------------------------------------------------- variables


def abstract_variables(model, image_size=(64, 64)) -> dict:
  """The variables' shapes (jax.eval_shape: nothing is initialised)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, *image_size), jnp.float32)))


def fill(target: Any, mapped: Dict[Tuple[str, ...], np.ndarray], source: str,
         prefix: Tuple[str, ...] = ()) -> dict:
  """Places mapped arrays into the structure of `target` (shapes), checking every leaf.

  Args:
    target: a variables tree of ShapeDtypeStructs or arrays.
    mapped: {flat path: array} from convnext_keys.map_keys.
    source: the file, for messages.
    prefix: only target leaves under this flat prefix must be filled (e.g. the backbone).

  Raises:
    InputError: naming missing paths, paths the target lacks, and shape mismatches.
  """
  flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x, dict(target)))
  want = {p: v for p, v in flat.items() if p[:len(prefix)] == prefix}
  extra = sorted("/".join(p) for p in mapped if p not in want)
  missing = sorted("/".join(p) for p in want if p not in mapped)
  bad = [f"{'/'.join(p)}: file {mapped[p].shape} vs model {tuple(want[p].shape)}"
         for p in want if p in mapped and tuple(mapped[p].shape) != tuple(want[p].shape)]
  problems = ([f"missing {missing[:8]}"] if missing else []) + (
      [f"not in the model {extra[:8]}"] if extra else []) + (
      [f"shape mismatch {bad[:8]}"] if bad else [])
  if problems:
    raise fileio.InputError(f"{source}: does not fit the model: " + "; ".join(problems))
  out = {p: jnp.asarray(mapped[p], want[p].dtype) for p in want}
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str, torchscript: bool = False) -> convnext_keys.StateDict:
  """A state dict as numpy arrays from .pth/.pt (torch), .safetensors, or TorchScript.

  Raises:
    InputError: missing or unreadable file, or a TorchScript file without `torchscript`.
  """
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise fileio.InputError(f"{path}: unreadable safetensors file ({e})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise fileio.InputError(f"{path}: reading torch files needs PyTorch (pip install "
                        "'deepssim-jax[parity]' or torch itself)") from None
  if _is_torchscript(path):  # checked first: torch.load would dispatch to torch.jit.load
    if not torchscript:
      raise fileio.InputError(f"{path} is a TorchScript archive: loading one runs its code. "
                          "Pass --torchscript (convert) or torchscript=True if you trust it.")
    try:
      obj = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise fileio.InputError(f"{path}: unreadable TorchScript ({type(e).__name__}: {e})") from None
  else:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise fileio.InputError(f"{path}: unreadable torch file ({type(e).__name__}: {e})") from None
  for nested in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and nested in obj and isinstance(obj[nested], dict):
      obj = obj[nested]
  if not isinstance(obj, dict):
    raise fileio.InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  return {k: v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in obj.items()}


def _is_torchscript(path: str) -> bool:
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
  except zipfile.BadZipFile:
    return False


def load(path: str, torchscript: bool = False, fmt: str = "auto", image_size=(136, 112)):
  """(make_model kwargs, variables) of the network a foreign file holds."""
  state = read_state_dict(path, torchscript)
  fmt = convnext_keys.detect_format(state) if fmt == "auto" else fmt
  kw = convnext_keys.infer_model(state, fmt)
  name = kw.pop("name")
  model = models.make_model(name, **kw)
  target = abstract_variables(model, image_size)
  prefix = ("params", "backbone") if convnext_keys.FORMATS[fmt]["head"] is None else ()
  variables = fill(target, convnext_keys.map_keys(state, fmt), path, prefix)
  return {"name": name, "format": fmt, **kw}, variables


def backbone_params(path: str, model, image_size) -> dict:
  """params['backbone'] of `model` from a foreign file (any format).

  Raises:
    InputError: the file does not hold this backbone (names the first keys that differ).
  """
  target = abstract_variables(model, image_size)["params"]["backbone"]
  state = read_state_dict(path, torchscript=False)
  mapped = convnext_keys.map_keys(state, convnext_keys.detect_format(state))
  mapped = {p: v for p, v in mapped.items() if p[:2] == ("params", "backbone")}
  tree = fill({"params": {"backbone": target}}, mapped, path, ("params", "backbone"))
  return tree["params"]["backbone"]


# ----------------------------------------------------------------------------- checkpoint


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checkpoint(out_dir: str, model_kw: dict, variables: dict, image_size,
                     provenance: dict) -> str:
  """Writes a workdir that every mode reads as `<out_dir>:best` (config.json beside an
  orbax checkpoint at step 0). Refuses a folder that already holds a checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  best = os.path.abspath(os.path.join(out_dir, "checkpoints", "best"))
  if os.path.isdir(best) and os.listdir(best):
    raise fileio.InputError(f"{out_dir}: already holds a checkpoint; choose a new folder")
  c = config_lib.base_config()
  c.model.name = model_kw["name"]
  c.model.head = model_kw["head"]
  c.model.num_frozen_stages = 0
  for k in ("embed_dim", "hidden_dim", "depths", "dims"):
    if k in model_kw:
      c.model.overrides[k] = (tuple(int(x) for x in model_kw[k])
                              if isinstance(model_kw[k], (tuple, list)) else int(model_kw[k]))
  c.data.image_size = tuple(int(x) for x in image_size)
  c.workdir = out_dir
  os.makedirs(out_dir, exist_ok=True)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "step": jnp.int32(0)}
  mngr = ocp.CheckpointManager(best, item_names=("state",),
                               options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  mngr.close()
  runs.save_config(out_dir, c)
  fileio.write_json(os.path.join(out_dir, "converted_from.json"), provenance)
  return out_dir


def convert(src: str, out_dir: str, torchscript: bool = False, fmt: str = "auto",
            image_size=(136, 112)) -> dict:
  """Converts a foreign file into a checkpoint folder (see write_checkpoint)."""
  kw, variables = load(src, torchscript, fmt, image_size)
  if kw["format"] in ("torchvision", "timm"):  # a bare backbone: the head stays random
    logging.warning("%s holds a backbone only; the head of %s is randomly initialised "
                    "(use it as model.init_from for training)", src, out_dir)
    model = models.make_model(kw["name"], **{k: v for k, v in kw.items()
                                             if k not in ("name", "format")})
    full = jax.jit(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, *image_size), jnp.float32)))()
    full = jax.tree.map(lambda x: x, dict(full))
    full["params"] = dict(full["params"])
    full["params"]["backbone"] = variables["params"]["backbone"]
    variables = full
  provenance = {"source": os.path.abspath(src), "sha256": file_sha256(src),
                "format": kw["format"], "model": {k: v for k, v in kw.items()
                                                   if k != "format"}}
  write_checkpoint(out_dir, kw, variables, image_size, provenance)
  logging.info("Converted %s (%s, %s) -> %s:best", src, kw["format"], kw["name"], out_dir)
  return provenance


def _define_flags() -> None:
  # Only when run as a script: the module is also imported (by train), and absl refuses a
  # flag defined twice (__main__ and deepssim_jax.convert).
  flags.DEFINE_string("from", None, "File to convert (.pth, .safetensors, .pt).")
  flags.DEFINE_string("to", None, "New folder for the checkpoint (read as <to>:best).")
  flags.DEFINE_bool("torchscript", False, "Allow loading TorchScript (runs its code).")
  flags.DEFINE_enum("format", "auto", ["auto"] + sorted(convnext_keys.FORMATS), "Source format.")
  flags.DEFINE_list("image_size", ["136", "112"], "H,W the checkpoint's config records (the "
                    "images it will embed are resampled to it).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f["from"].value or not f.to:
    raise app.UsageError("--from=FILE and --to=NEW_FOLDER are required")
  try:
    convert(f["from"].value, f.to, f.torchscript, f.format,
            tuple(int(x) for x in f.image_size))
  except fileio.InputError as e:
    raise SystemExit(f"convert: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
