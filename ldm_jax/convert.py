"""MONAI files <-> ldm_jax weights: .pth reading (old names too), run import and export, the CLI.

The reference saved its AutoencoderKL, PatchDiscriminator and DiffusionModelUNet with
`torch.save(model.state_dict())`. The key tables that map those state dicts to our
variables, and the pure mapping both ways, are ldm_jax/monai_keys.py's; this module is what
touches files, torch and MONAI around them. The reference used MONAI Generative 0.2.x (the
`generative` package), whose attention and upsampling layers have older names (`proj_attn`,
`to_out.0`, attention projections one level up, `conv` for `postconv`): `upgrade_old_keys`
renames them with MONAI's own `load_old_state_dict` (MONAI >= 1.4), refusing keys it leaves
over or does not fill, and loads the `proj_attn` those versions define but never apply as an
identity (MONAI would copy its random weights into a projection that is applied). torch
(and MONAI) are imported only inside the readers and writers.

Entry points: `load_state_dict(path)`, `load(kind, path_or_state, model)` (old or new names ->
variables), `make_model(kind, name, overrides)` (the trainers' registries),
`monai_network(kind, model)` (MONAI's torch network with our module's settings),
`import_run` / `export_run` (a MONAI file as an ldm_jax run workdir and back), .npz files of
variables, and the command line. kind: autoencoder, discriminator or unet.

    python -m ldm_jax.convert --kind=unet --from=unet-ep-100.pth --to=unet.npz
    python -m ldm_jax.convert --kind=autoencoder --from=ae.npz --to_monai=ae.pth
"""

import json
import os
import re
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from flax import traverse_util

from deepssim_jax import fileio, runs
from deepssim_jax import convert as deepssim_convert
from ldm_jax.monai_keys import (KINDS, StateDict, abstract_variables, as_variables, from_monai,
                                infer_overrides, is_old_style, to_monai, to_numpy)


# ----------------------------------------------------------------------------- MONAI's networks


def monai_kwargs(kind: str, model: Any) -> dict:
  """The MONAI constructor arguments of the network an ldm_jax module reproduces."""
  f = lambda *names: {n: getattr(model, n) for n in names}
  if kind == "autoencoder":
    return f("spatial_dims", "in_channels", "out_channels", "num_res_blocks", "channels",
             "attention_levels", "latent_channels", "norm_num_groups", "norm_eps",
             "with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn")
  if kind == "discriminator":
    return {**f("spatial_dims", "channels", "in_channels", "out_channels", "num_layers_d",
                "kernel_size", "padding", "dropout", "last_conv_kernel_size"),
            "activation": ("LEAKYRELU", {"negative_slope": model.negative_slope})}
  if kind == "unet":
    return f("spatial_dims", "in_channels", "out_channels", "num_res_blocks", "channels",
             "attention_levels", "norm_num_groups", "norm_eps", "resblock_updown",
             "num_head_channels", "with_conditioning", "transformer_num_layers",
             "cross_attention_dim")
  raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


def monai_network(kind: str, model: Any):
  """MONAI's torch network with the settings of an ldm_jax module (needs monai)."""
  from monai.networks import nets  # pylint: disable=g-import-not-at-top
  cls = {"autoencoder": nets.AutoencoderKL, "discriminator": nets.PatchDiscriminator,
         "unet": nets.DiffusionModelUNet}[kind]
  return cls(**monai_kwargs(kind, model))


PROJ_ATTN = ("identity", "copy")


def upgrade_old_keys(kind: str, state_dict: StateDict, model: Any, source: str = "state dict",
                     proj_attn: str = "identity") -> Dict[str, np.ndarray]:
  """Renames MONAI Generative keys to MONAI's with MONAI's own load_old_state_dict.

  MONAI's method copies what it recognises into a freshly initialised network and silently
  keeps the random initialisation for anything the old dict lacks; here the network starts
  as NaN and every key it leaves over or does not fill is an error.

  The self-attention blocks of MONAI Generative 0.2.0 - 0.2.3 (the AutoencoderKL's, and the
  unconditioned DiffusionModelUNet's) define a `proj_attn` Linear but never apply it (its
  weights stay at their random initialisation; Project-MONAI/MONAI#7991): MONAI 1.6's
  load_old_state_dict copies it into `attn.out_proj`, which changes what the network
  computes. proj_attn="identity" (default) loads out_proj as the identity with zero bias
  instead, so the converted network computes what the reference's did; "copy" keeps MONAI's
  behaviour (right for MONAI Generative 0.1.0's UNet, which applied proj_attn).

  Args:
    kind: "autoencoder" or "unet" (the discriminator's names never changed).
    state_dict: {old key: tensor or array}.
    model: the ldm_jax module whose settings the MONAI network is built with.
    source: what to call the state dict in messages.
    proj_attn: "identity" or "copy", see above.

  Returns:
    {MONAI key: numpy array}, for from_monai.

  Raises:
    InputError: naming leftover, missing or mis-shaped keys.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if proj_attn not in PROJ_ATTN:
    raise ValueError(f"proj_attn must be one of {PROJ_ATTN}, got {proj_attn!r}")
  if kind == "discriminator":
    return {k: to_numpy(v) for k, v in state_dict.items()}
  net = monai_network(kind, model)
  with torch.no_grad():
    for t in net.state_dict().values():
      if t.is_floating_point():
        t.fill_(float("nan"))
  old = {k: torch.as_tensor(to_numpy(v)) for k, v in state_dict.items()}
  if proj_attn == "identity":
    for k, v in old.items():
      if k.endswith(".proj_attn.weight") and v.ndim == 2 and v.shape[0] == v.shape[1]:
        old[k] = torch.eye(v.shape[0], dtype=v.dtype)
      elif k.endswith(".proj_attn.bias"):
        old[k] = torch.zeros_like(v)
  try:
    net.load_old_state_dict(old)
  except KeyError as e:
    raise fileio.InputError(
        f"{source}: old-style {kind} state dict lacks key {e.args[0]!r}") from None
  except RuntimeError as e:  # load_state_dict: size mismatches, one line each
    bad = [f"{m[1]}: file ({m[2]}) vs model ({m[3]})" for m in re.finditer(
        r"size mismatch for (\S+): copying a param with shape torch.Size\(\[([^\]]*)\]\) from "
        r"checkpoint, the shape in current model is torch.Size\(\[([^\]]*)\]\)", str(e))]
    detail = f"{len(bad)} mis-shaped key(s) {bad[:8]}" if bad else str(e)[:2000]
    raise fileio.InputError(f"{source}: old-style (MONAI Generative) {kind} state dict does not "
                        f"fit the network: {detail}") from None
  new = {k: v.numpy() for k, v in net.state_dict().items()}
  unfilled = sorted(k for k, v in new.items() if v.dtype.kind == "f" and np.isnan(v).any())
  problems = ([f"{len(old)} unknown key(s) {sorted(old)[:8]}"] if old else []) + (
      [f"{len(unfilled)} missing key(s) {unfilled[:8]}"] if unfilled else [])
  if problems:
    raise fileio.InputError(f"{source}: old-style (MONAI Generative) {kind} state dict does not "
                        "fit the network: " + "; ".join(problems))
  return new


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A state dict saved with torch.save(model.state_dict()), as numpy arrays.

  Read with torch.load(weights_only=True, map_location="cpu") (deepssim_jax.convert's
  reader: TorchScript is refused, {"state_dict": ...} wrappers are unwrapped).

  Raises:
    InputError: a missing or unreadable file.
  """
  return deepssim_convert.read_state_dict(path, torchscript=False)


def load(kind: str, path_or_state: Any, model: Any, source: Optional[str] = None,
         proj_attn: str = "identity") -> dict:
  """Variables of `model` from a MONAI state dict (a .pth path or a dict), old names or new.

  Args:
    kind: "autoencoder", "discriminator" or "unet".
    path_or_state: a file written by torch.save(model.state_dict()), or the dict itself.
    model: the ldm_jax module the weights are for.
    source: what to call a dict in messages (default "state dict"; a path names itself).
    proj_attn: for old (MONAI Generative) names: see upgrade_old_keys.

  Returns:
    Variables {"params": ...[, "batch_stats": ...]} for model.apply.

  Raises:
    InputError: naming the file and the keys that do not fit.
  """
  if isinstance(path_or_state, str):
    source, state = source or path_or_state, load_state_dict(path_or_state)
  else:
    source, state = source or "state dict", dict(path_or_state)
  if is_old_style(kind, state):
    state = upgrade_old_keys(kind, state, model, source, proj_attn)
  return from_monai(kind, state, abstract_variables(kind, model), source)


# ----------------------------------------------------------------------------- models


DEFAULT_MODELS = {"autoencoder": "AutoencoderKL_ref", "discriminator": "PatchDiscriminator_ref",
                  "unet": "DiffusionModelUNet_ref"}


def make_model(kind: str, name: Optional[str] = None, overrides: Optional[dict] = None):
  """An ldm_jax network by its config name (the trainers' registries) and overrides."""
  # pylint: disable=g-import-not-at-top (the trainers import much this module does not need)
  if kind == "unet":
    from ldm_jax.train_diffusion import UNETS as registry
  elif kind == "autoencoder":
    from ldm_jax.train_autoencoder import AUTOENCODERS as registry
  elif kind == "discriminator":
    from ldm_jax.train_autoencoder import DISCRIMINATORS as registry
  else:
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
  name = name or DEFAULT_MODELS[kind]
  if name not in registry:
    raise fileio.InputError(f"unknown {kind} model {name!r}; choose one of {sorted(registry)}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
  return registry[name](**kw)


# ----------------------------------------------------------------------------- runs


def import_run(config: Any, workdir: str, path: str, discriminator: Optional[str] = None,
               proj_attn: str = "identity") -> str:
  """Writes an ldm_jax run workdir holding a MONAI file's weights, for the other modes.

  config.mode decides what `path` is: "autoencoder" (an AutoencoderKL state dict, e.g. the
  reference's autoencoder-ep-<k>.pth; `discriminator` optionally its
  discriminator-ep-<k>.pth, else a freshly initialised one) or "diffusion" (a
  DiffusionModelUNet state dict, e.g. unet-ep-<k>.pth; with train.ema_decay > 0 the EMA
  starts as these weights). The workdir gets config.json, a checkpoint at step 0 (latest;
  there is no best) and converted_from.json (file, sha256, kind). Diffusion runs encode with
  an imported autoencoder (autoencoder.workdir, autoencoder.checkpoint "latest") and
  --mode=generate samples an imported UNet (generate.checkpoint "latest"); training from it
  starts a new run (its data fingerprint differs) and is refused in this workdir.

  Raises:
    InputError: the workdir already holds checkpoints, the file does not fit the config's
      network (naming the keys), or its conditioning differs from config.cond.
  """
  # pylint: disable=g-import-not-at-top
  from ldm_jax import common, train_autoencoder, train_diffusion
  if common.has_checkpoints(workdir):
    raise fileio.InputError(f"{workdir}: already holds checkpoints; choose a new folder")
  state_dict = load_state_dict(path)
  key = jax.random.key(config.seed)
  mode = config.get("mode", "")
  if mode == "autoencoder":
    state = train_autoencoder.create_state(config, key)
    ae = load("autoencoder", state_dict, train_autoencoder.make_autoencoder(config.model),
              source=path, proj_attn=proj_attn)
    state["g"] = state["g"].replace(params=ae["params"])
    if discriminator:
      d = load("discriminator", discriminator,
               train_autoencoder.make_discriminator(config.disc), proj_attn=proj_attn)
      state["d"] = state["d"].replace(params=d["params"], batch_stats=d["batch_stats"])
    kinds = {"autoencoder": path, **({"discriminator": discriminator} if discriminator else {})}
  elif mode == "diffusion":
    found = infer_overrides("unet", state_dict)
    want = config.cond.kind != "none"
    if found["with_conditioning"] != want:
      kind = "conditioned" if found["with_conditioning"] else "unconditioned"
      raise fileio.InputError(f"{path}: a {kind} UNet, but config.cond.kind is "
                              f"{config.cond.kind!r}")
    dim = found["cross_attention_dim"]
    model = train_diffusion.make_unet(config, found["in_channels"], dim)
    variables = load("unet", state_dict, model, source=path, proj_attn=proj_attn)
    side = 2 ** (len(model.channels) - 1)
    state = train_diffusion.create_state(config, model, (side, side, found["in_channels"]),
                                         key, cross_attention_dim=dim)
    state = state.replace(params=variables["params"],
                          ema_params=variables["params"] if state.ema_params is not None
                          else None)
    kinds = {"unet": path}
  else:
    raise fileio.InputError(f"config.mode {mode!r}: import needs an 'autoencoder' or 'diffusion' "
                        "config (e.g. configs/ldm_ixi_autoencoder.py)")
  os.makedirs(workdir, exist_ok=True)
  mngr = common.checkpoint_manager(workdir, keep=1)
  common.save(mngr, 0, state, {"step": 0, "spec": {"imported": {
      k: deepssim_convert.file_sha256(v) for k, v in kinds.items()}}})
  mngr.wait_until_finished()
  mngr.close()
  runs.save_config(workdir, config)
  fileio.write_json(os.path.join(workdir, "converted_from.json"), {
      k: {"file": os.path.abspath(v), "sha256": deepssim_convert.file_sha256(v)}
      for k, v in kinds.items()} | {"proj_attn": proj_attn})
  return workdir


def export_run(workdir: str, which: str = "latest") -> Dict[str, StateDict]:
  """MONAI state dicts (torch tensors) of a run's networks: {"autoencoder",
  "discriminator"} of an autoencoder run (the discriminator only from "latest"), {"unet"}
  of a diffusion run (its EMA weights when it keeps them), from its latest or best
  checkpoint. Restored without a target, so no training data is needed."""
  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp
  from ldm_jax import common
  config = runs.load_config(workdir)
  mode = config.get("mode", "")
  if mode not in ("autoencoder", "diffusion"):
    raise fileio.InputError(f"{workdir}: config.json has mode {mode!r}; not an ldm_jax run")
  if which == "best":
    if not os.path.isdir(os.path.join(workdir, "best")):
      raise fileio.InputError(f"{workdir}: no best-validation weights (trained without a "
                          "validation split); export the latest checkpoint")
    mngr = common.best_manager(workdir, create=False)
    step, item = mngr.best_step(), "weights"
  else:
    mngr = common.checkpoint_manager(workdir, keep=1, create=False)
    step, item = mngr.latest_step(), "state"
  if step is None:
    mngr.close()
    raise fileio.InputError(f"{workdir}: no {which} checkpoint")
  tree = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
  mngr.close()
  ema = float(config.get("train", {}).get("ema_decay", 0.0)) > 0
  if mode == "diffusion":
    return {"unet": to_monai("unet", tree if which == "best" else
                             tree["ema_params" if ema else "params"])}
  if which == "best":
    return {"autoencoder": to_monai("autoencoder", tree)}
  return {"autoencoder": to_monai("autoencoder", tree["g"]["params"]),
          "discriminator": to_monai("discriminator", {"params": tree["d"]["params"],
                                                      "batch_stats": tree["d"]["batch_stats"]})}


# ----------------------------------------------------------------------------- files


def save_npz(path: str, variables: Any) -> None:
  """Writes variables as one .npz, keys "<collection>/<module>/.../<leaf>" (atomic)."""
  flat = traverse_util.flatten_dict(as_variables(variables))
  fileio.write_npz(path, **{"/".join(p): np.asarray(v) for p, v in flat.items()})


def load_npz(path: str) -> dict:
  """Variables written by save_npz."""
  try:
    with np.load(path) as z:
      return traverse_util.unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})
  except (OSError, ValueError) as e:
    raise fileio.InputError(f"{path}: unreadable .npz ({e})") from None


def save_state_dict(path: str, state_dict: StateDict) -> None:
  """torch.save of a state dict (torch tensors), written atomically."""
  import torch  # pylint: disable=g-import-not-at-top
  with fileio.atomic_open(path, "wb") as f:
    torch.save(state_dict, f)


def _define_flags() -> None:
  # Only when run as a script (absl refuses a flag defined twice).
  flags.DEFINE_enum("kind", None, list(KINDS), "Network (file to file).")
  flags.DEFINE_string("from", None, "MONAI state dict (.pth/.pt, old or new names) or our .npz.")
  flags.DEFINE_string("to", None, "Write our variables here (.npz).")
  flags.DEFINE_string("to_monai", None, "Write a MONAI (>= 1.4 names) state dict here (.pth).")
  flags.DEFINE_string("model", None, "ldm_jax model name (default: the reference's, e.g. "
                      "DiffusionModelUNet_ref), as config.model.name.")
  flags.DEFINE_string("overrides", "{}", "JSON of model settings, as config.model.overrides; "
                      "channels and conditioning of a UNet are read from the file.")
  flags.DEFINE_enum("proj_attn", "identity", list(PROJ_ATTN), "Old (MONAI Generative) files: "
                    "load the unused proj_attn as an identity out_proj (0.2.x) or copy it "
                    "(0.1.0's UNet applied it).")
  config_flags.DEFINE_config_file("config", None, "With --from and --workdir: an ldm_jax "
                                  "config whose mode (autoencoder or diffusion) and network "
                                  "the file is imported as.", lock_config=True)
  flags.DEFINE_string("workdir", None, "With --config and --from: the run folder to create; "
                      "with --to_monai_dir: the run to export.")
  flags.DEFINE_string("discriminator", None, "With an autoencoder import: its "
                      "PatchDiscriminator state dict.")
  flags.DEFINE_string("to_monai_dir", None, "Export a run's networks as MONAI state dicts "
                      "(autoencoder.pth [+ discriminator.pth] or unet.pth) into this folder.")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "With --to_monai_dir: which.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  src = f["from"].value
  try:
    if f.to_monai_dir:
      if not f.workdir:
        raise app.UsageError("--to_monai_dir needs --workdir (the run to export)")
      os.makedirs(f.to_monai_dir, exist_ok=True)
      for name, sd in export_run(f.workdir, f.checkpoint).items():
        save_state_dict(os.path.join(f.to_monai_dir, f"{name}.pth"), sd)
      return
    if f.config is not None:
      if not src or not f.workdir:
        raise app.UsageError("--config needs --from (the MONAI file) and --workdir")
      import_run(f.config, f.workdir, src, f.discriminator, f.proj_attn)
      return
    if not f.kind or not src or not (f.to or f.to_monai):
      raise app.UsageError("--kind, --from and --to and/or --to_monai are required (or "
                           "--config, --from, --workdir; or --workdir, --to_monai_dir)")
    try:
      overrides = json.loads(f.overrides)
    except json.JSONDecodeError as e:
      raise app.UsageError(f"--overrides is not JSON ({e})") from None
    if src.endswith(".npz"):
      variables = load_npz(src)
      to_monai(f.kind, variables, as_torch=False)  # checks every module maps
    else:
      state = load_state_dict(src)
      overrides = {**infer_overrides(f.kind, state), **overrides}
      variables = load(f.kind, state, make_model(f.kind, f.model, overrides), source=src,
                       proj_attn=f.proj_attn)
    if f.to:
      save_npz(f.to, variables)
    if f.to_monai:
      save_state_dict(f.to_monai, to_monai(f.kind, variables))
  except fileio.InputError as e:
    raise SystemExit(f"convert: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
