"""MONAI state dicts <-> ldm_jax variables, for the three networks of the latent diffusion model.

The reference trained MONAI's AutoencoderKL, PatchDiscriminator and DiffusionModelUNet and
saved them with `torch.save(model.state_dict())`. Our networks (autoencoder.py,
discriminator.py, unet.py) are those layer for layer and name their submodules after MONAI's
state-dict keys, so one table of rows per network maps every MONAI module to ours:

  (MONAI module template, our module template, kind)

e.g. ("{m:encoder|decoder}.blocks.{i}.{c:conv1|conv2|nin_shortcut}.conv", "{m}/blocks_{i}/{c}",
"conv"). A placeholder is `{name:regex}` (default regex: digits) on the MONAI side and `{name}`
on ours. The kind (LEAVES) names each parameter and its transform: conv weights OIHW ->
HWIO, linear weights (out, in) -> (in, out), norm weight -> scale, BatchNorm running stats ->
the `batch_stats` collection (num_batches_tracked is dropped, and exported as 0: torch reads
it only when momentum is None, MONAI's is 0.1). The rows are read from our side: each module
of our network gives the MONAI keys (and shapes) it takes, which both checks an import and
writes an export; MONAI -> ours -> MONAI gives back every tensor exactly.

`from_monai` checks a state dict against the keys and shapes the target network has (from
jax.eval_shape of its init, through the rows) and raises InputError naming every unknown,
missing and mis-shaped key. The reference used MONAI Generative 0.2.x (the
`generative` package), whose attention and upsampling layers have older names (`proj_attn`,
`to_out.0`, attention projections one level up, `conv` for `postconv`): `upgrade_old_keys`
renames them with MONAI's own `load_old_state_dict` (MONAI >= 1.4), refusing keys it leaves
over or does not fill, and loads the `proj_attn` those versions define but never apply as an
identity (MONAI would copy its random weights into a projection that is applied). torch
(and MONAI) are imported only inside the readers and writers.

Entry points: `from_monai(kind, state_dict, target)` and `to_monai(kind, variables)` (pure),
`load_state_dict(path)`, `load(kind, path_or_state, model)` (old or new names -> variables),
`abstract_variables(kind, model)` (the target), `make_model(kind, name, overrides)` (the
trainers' registries) and `infer_overrides(kind, state_dict)`. kind: autoencoder,
discriminator or unet.

    python -m ldm_jax.convert --kind=unet --from=unet-ep-100.pth --to=unet.npz
    python -m ldm_jax.convert --kind=autoencoder --from=ae.npz --to_monai=ae.pth
"""

import json
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from flax import traverse_util

from deepssim_jax import fileio, runs
from deepssim_jax import convert as deepssim_convert

StateDict = Dict[str, Any]
Path = Tuple[str, ...]

KINDS = ("autoencoder", "discriminator", "unet")

# ----------------------------------------------------------------------------- leaves


def _conv_in(w: np.ndarray) -> np.ndarray:  # (O, I, *k) -> (*k, I, O)
  nd = w.ndim - 2
  return np.transpose(w, tuple(range(2, 2 + nd)) + (1, 0))


def _conv_out(w: np.ndarray) -> np.ndarray:  # (*k, I, O) -> (O, I, *k)
  nd = w.ndim - 2
  return np.transpose(w, (nd + 1, nd) + tuple(range(nd)))


# name: (MONAI -> ours, ours -> MONAI), both shape-only (exact copies of every value).
TRANSFORMS: Dict[str, Tuple[Callable, Callable]] = {
    "conv": (_conv_in, _conv_out),
    "linear": (np.transpose, np.transpose),
    "same": (lambda w: w, lambda w: w),
}

_AFFINE = {"weight": ("params", "scale", "same"), "bias": ("params", "bias", "same")}
# kind: {MONAI parameter: (our collection, our leaf, transform)}; None: dropped on import.
LEAVES: Dict[str, Dict[str, Optional[Tuple[str, str, str]]]] = {
    "conv": {"weight": ("params", "kernel", "conv"), "bias": ("params", "bias", "same")},
    "linear": {"weight": ("params", "kernel", "linear"), "bias": ("params", "bias", "same")},
    "norm": _AFFINE,  # GroupNorm, LayerNorm
    "batchnorm": {**_AFFINE, "running_mean": ("batch_stats", "mean", "same"),
                  "running_var": ("batch_stats", "var", "same"), "num_batches_tracked": None},
}

# ----------------------------------------------------------------------------- rows

AUTOENCODER_ROWS = (
    ("{m:encoder|decoder}.blocks.{i}.conv", "{m}/blocks_{i}", "conv"),  # first and last conv
    ("{m:encoder|decoder}.blocks.{i}", "{m}/blocks_{i}", "norm"),  # the final GroupNorm
    ("{m:encoder|decoder}.blocks.{i}.{c:conv1|conv2|nin_shortcut|conv|postconv}.conv",
     "{m}/blocks_{i}/{c}", "conv"),  # residual blocks, downsampling, upsampling
    ("{m:encoder|decoder}.blocks.{i}.{n:norm1|norm2|norm}", "{m}/blocks_{i}/{n}", "norm"),
    ("{m:encoder|decoder}.blocks.{i}.attn.{p:to_q|to_k|to_v|out_proj}",
     "{m}/blocks_{i}/attn/{p}", "linear"),
    ("{q:quant_conv_mu|quant_conv_log_sigma|post_quant_conv}.conv", "{q}", "conv"),
)

DISCRIMINATOR_ROWS = (
    ("{c:initial_conv|final_conv}.conv", "{c}", "conv"),
    ("{i}.conv", "layer_{i}/conv", "conv"),
    ("{i}.adn.N", "layer_{i}/norm", "batchnorm"),
)

# Inside one UNet block: (MONAI suffix, our suffix, kind).
_RESNET = (
    ("{n:norm1|norm2}", "{n}", "norm"),
    ("{c:conv1|conv2|skip_connection}.conv", "{c}", "conv"),
    ("time_emb_proj", "time_emb_proj", "linear"),
)
_ATTENTION = (  # SpatialAttentionBlock (unconditioned) and SpatialTransformer (conditioned)
    ("norm", "norm", "norm"),
    ("attn.{p:to_q|to_k|to_v|out_proj}", "attn/{p}", "linear"),
    ("{p:proj_in|proj_out}.conv", "{p}", "conv"),
    ("transformer_blocks.{t}.{n:norm1|norm2|norm3}", "transformer_blocks_{t}/{n}", "norm"),
    ("transformer_blocks.{t}.{a:attn1|attn2}.{p:to_q|to_k|to_v|out_proj}",
     "transformer_blocks_{t}/{a}/{p}", "linear"),
    ("transformer_blocks.{t}.ff.{l:linear1|linear2}", "transformer_blocks_{t}/ff/{l}", "linear"),
)
# The UNet's blocks: MONAI's path, flattened with "_" in ours.
_UNET_BLOCKS = (
    ("{d:down|up}_blocks.{i}.resnets.{j}", "{d}_blocks_{i}_resnets_{j}", _RESNET),
    ("{d:down|up}_blocks.{i}.{s:downsampler|upsampler}", "{d}_blocks_{i}_{s}", _RESNET),
    ("middle_block.{r:resnet_1|resnet_2}", "middle_block_{r}", _RESNET),
    ("{d:down|up}_blocks.{i}.attentions.{j}", "{d}_blocks_{i}_attentions_{j}", _ATTENTION),
    ("middle_block.attention", "middle_block_attention", _ATTENTION),
)
UNET_ROWS = tuple((f"{theirs}.{sub}", f"{ours}/{sub_ours}", kind)
                  for theirs, ours, inner in _UNET_BLOCKS
                  for sub, sub_ours, kind in inner) + (
    ("conv_in.conv", "conv_in", "conv"),
    ("time_embed.{t:0|2}", "time_embed_{t}", "linear"),
    ("down_blocks.{i}.downsampler.op.conv", "down_blocks_{i}_downsampler_op", "conv"),
    ("up_blocks.{i}.upsampler.postconv.conv", "up_blocks_{i}_upsampler_postconv", "conv"),
    ("out.0", "out_0", "norm"),
    ("out.2.conv", "out_2", "conv"),
)

ROWS = {"autoencoder": AUTOENCODER_ROWS, "discriminator": DISCRIMINATOR_ROWS,
        "unet": UNET_ROWS}

# Key names only MONAI Generative 0.2.x (the `generative` package) wrote: attention projections
# directly on the block (to_q, proj_attn), the transformer's to_out.0, upsampling "conv"
# (now "postconv": the decoder has no other conv.conv; the UNet's upsampler neither).
OLD_STYLE = {
    "autoencoder": r"(\.proj_attn\.|^(encoder|decoder)\.blocks\.\d+\.to_[qkv]\.|"
                   r"^decoder\.blocks\.\d+\.conv\.conv\.)",
    "discriminator": None,
    "unet": r"(\.proj_attn\.|\.to_out\.0\.|(attentions\.\d+|middle_block\.attention)\.to_[qkv]\.|"
            r"upsampler\.conv\.conv\.)",
}


def _compile_row(theirs: str, ours: str, kind: str):
  """A row as (regex over our module path, format of MONAI's module name, kind)."""
  groups = {m[1]: m[2] or r"\d+" for m in re.finditer(r"\{(\w+)(?::([^}]*))?\}", theirs)}
  pattern, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", ours):
    pattern += [re.escape(ours[pos:m.start()]), f"(?P<{m[1]}>{groups[m[1]]})"]
    pos = m.end()
  pattern.append(re.escape(ours[pos:]))
  return re.compile("".join(pattern)), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", theirs), kind


_COMPILED: Dict[str, list] = {}


def _rows(kind: str) -> list:
  if kind not in ROWS:
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
  if kind not in _COMPILED:
    _COMPILED[kind] = [_compile_row(*row) for row in ROWS[kind]]
  return _COMPILED[kind]


# ----------------------------------------------------------------------------- key mapping


def _monai_keys(kind: str, variables: Any) -> Dict[str, Tuple[Optional[Path], str]]:
  """{MONAI key: (our flat path or None, transform)} for every leaf of a variables tree,
  in MONAI's parameter order within each module (None: a dropped key, num_batches_tracked).

  Raises:
    InputError: a module of ours no row maps (a network this converter does not know).
  """
  flat = traverse_util.flatten_dict(_as_variables(variables))
  modules: Dict[Path, Dict[Tuple[str, str], Path]] = {}
  for path in flat:
    modules.setdefault(path[1:-1], {})[(path[0], path[-1])] = path
  out = {}
  for module, leaves in modules.items():
    name = "/".join(module)
    for our_re, their_fmt, row_kind in _rows(kind):
      m = our_re.fullmatch(name)
      spec = {k: s for k, s in LEAVES[row_kind].items() if s is None or (s[0], s[1]) in leaves}
      allowed = {(s[0], s[1]) for s in LEAVES[row_kind].values() if s is not None}
      required = {(s[0], s[1]) for k, s in LEAVES[row_kind].items() if s and k != "bias"}
      if m and required <= set(leaves) <= allowed:  # a bias is optional (conv bias=False)
        prefix = their_fmt.format(**m.groupdict())
        for their_leaf, s in spec.items():
          out[f"{prefix}.{their_leaf}"] = ((None, "same") if s is None
                                           else (leaves[(s[0], s[1])], s[2]))
        break
    else:
      raise fileio.InputError(f"{kind}: no MONAI name for our module {name!r} "
                          f"(leaves {sorted('/'.join(x) for x in leaves)})")
  return out


def _as_variables(tree: Any) -> dict:
  """A variables dict ({"params": ..., ["batch_stats": ...]}) from variables or bare params."""
  tree = dict(tree)
  if tree and set(tree) <= {"params", "batch_stats"}:
    return tree
  return {"params": tree}


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _torch_shape(shape: Sequence[int], transform: str) -> Tuple[int, ...]:
  shape = tuple(shape)
  if transform == "conv":
    return (shape[-1], shape[-2]) + shape[:-2]
  if transform == "linear":
    return shape[::-1]
  return shape


def is_old_style(kind: str, keys: Sequence[str]) -> bool:
  """Whether state-dict keys use MONAI Generative 0.2.x names (see OLD_STYLE)."""
  _rows(kind)
  pattern = OLD_STYLE[kind]
  return pattern is not None and any(re.search(pattern, k) for k in keys)


def from_monai(kind: str, state_dict: StateDict, target: Any,
               source: str = "state dict") -> dict:
  """A MONAI (>= 1.4 names) state dict -> our variables, checked against a target network.

  Args:
    kind: "autoencoder", "discriminator" or "unet".
    state_dict: {key: torch tensor or numpy array}, e.g. torch.load(path) or
      model.state_dict() (old MONAI Generative names: run upgrade_old_keys first).
    target: the network's variables or their shapes, e.g. abstract_variables(kind, model).
    source: what to call the state dict in messages (the file).

  Returns:
    Variables {"params": ...} ("batch_stats" too for the discriminator) with the target's
    structure and dtypes; the values are exact copies.

  Raises:
    InputError: naming the source and every unknown, missing and mis-shaped key (in MONAI's
      names, with both shapes).
  """
  state = {k: _numpy(v) for k, v in state_dict.items()}
  expected = _monai_keys(kind, target)
  flat_target = traverse_util.flatten_dict(_as_variables(target))
  unknown = sorted(k for k in state if k not in expected)
  missing = sorted(k for k, (p, _) in expected.items() if p is not None and k not in state)
  bad = []
  for k, (path, transform) in expected.items():
    if path is not None and k in state:
      want = _torch_shape(flat_target[path].shape, transform)
      if tuple(state[k].shape) != want:
        bad.append(f"{k}: file {tuple(state[k].shape)} vs model {want}")
  problems = ([f"{len(unknown)} unknown key(s) {unknown[:8]}"] if unknown else []) + (
      [f"{len(missing)} missing key(s) {missing[:8]}"] if missing else []) + (
      [f"{len(bad)} mis-shaped key(s) {bad[:8]}"] if bad else [])
  if problems:
    hint = (" (these are MONAI Generative 0.2.x names: convert with upgrade_old_keys or "
            "load, which rename them through MONAI's load_old_state_dict)"
            if is_old_style(kind, state) else "")
    raise fileio.InputError(f"{source}: does not fit the {kind}: " + "; ".join(problems) + hint)
  out = {}
  for k, (path, transform) in expected.items():
    if path is not None:
      # A copy: jnp.asarray may alias host memory on CPU, and torch's state_dict() arrays
      # are the live tensors (BatchNorm updates its running statistics in place).
      out[path] = jnp.array(TRANSFORMS[transform][0](state[k]), flat_target[path].dtype,
                            copy=True)
  return traverse_util.unflatten_dict(out)


def to_monai(kind: str, variables: Any, as_torch: bool = True) -> StateDict:
  """Our variables -> a MONAI (>= 1.4 names) state dict, loadable with load_state_dict.

  Args:
    kind: "autoencoder", "discriminator" or "unet".
    variables: {"params": ...[, "batch_stats": ...]} or bare params (the discriminator's
      batch_stats are required: MONAI's BatchNorm has running statistics).
    as_torch: torch tensors (for torch.save) or, if False, numpy arrays.

  Returns:
    {MONAI key: tensor}, exact copies; BatchNorm's num_batches_tracked is 0 (not kept).

  Raises:
    InputError: a module no row maps, or the discriminator without batch_stats.
  """
  variables = _as_variables(variables)
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for k, (path, transform) in _monai_keys(kind, variables).items():
    out[k] = (np.zeros((), np.int64) if path is None else  # a writable copy, for torch
              np.array(TRANSFORMS[transform][1](np.asarray(flat[path])), order="C"))
  if as_torch:
    import torch  # pylint: disable=g-import-not-at-top
    out = {k: torch.from_numpy(v) for k, v in out.items()}
  return out


# ----------------------------------------------------------------------------- networks


def abstract_variables(kind: str, model: Any) -> dict:
  """The variables' shapes and dtypes of an ldm_jax network (jax.eval_shape of its init).

  Args:
    kind: "autoencoder", "discriminator" or "unet".
    model: the flax module (e.g. autoencoder.AutoencoderKL_ref()).

  Returns:
    {"params": ..., ["batch_stats": ...]} of jax.ShapeDtypeStruct.
  """
  nd = model.spatial_dims
  key = jax.random.key(0)
  if kind == "autoencoder":
    x = jnp.zeros((1,) + (2 ** len(model.channels),) * nd + (model.in_channels,))
    return jax.eval_shape(model.init, key, x)
  if kind == "discriminator":
    x = jnp.zeros((1,) + (2 ** (model.num_layers_d + 3),) * nd + (model.in_channels,))
    return jax.eval_shape(model.init, key, x)
  if kind == "unet":
    x = jnp.zeros((1,) + (2 ** len(model.channels),) * nd + (model.in_channels,))
    context = (jnp.zeros((1, 1, model.cross_attention_dim)) if model.with_conditioning
               else None)
    return jax.eval_shape(model.init, key, x, jnp.zeros((1,), jnp.int32), context)
  raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


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
    return {k: _numpy(v) for k, v in state_dict.items()}
  net = monai_network(kind, model)
  with torch.no_grad():
    for t in net.state_dict().values():
      if t.is_floating_point():
        t.fill_(float("nan"))
  old = {k: torch.as_tensor(_numpy(v)) for k, v in state_dict.items()}
  if proj_attn == "identity":
    for k, v in old.items():
      if k.endswith(".proj_attn.weight") and v.ndim == 2 and v.shape[0] == v.shape[1]:
        old[k] = torch.eye(v.shape[0], dtype=v.dtype)
      elif k.endswith(".proj_attn.bias"):
        old[k] = torch.zeros_like(v)
  try:
    net.load_old_state_dict(old)
  except KeyError as e:
    raise fileio.InputError(f"{source}: old-style {kind} state dict lacks key {e.args[0]!r}") from None
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


# ----------------------------------------------------------------------------- settings


def infer_overrides(kind: str, state_dict: StateDict) -> dict:
  """Network settings that single tensors of a state dict (old or new names) fix.

  Autoencoder: in_channels, out_channels, latent_channels. Discriminator: in_channels,
  out_channels, channels, num_layers_d. UNet: in_channels, out_channels, with_conditioning,
  cross_attention_dim (the fields ldm_jax's make_unet sets from the data rather than from
  model.overrides). Everything else comes from the model name and overrides; a mismatch is
  reported per key by from_monai.
  """
  shape = lambda k: tuple(np.shape(state_dict[k])) if k in state_dict else None
  out = {}
  if kind == "autoencoder":
    if (s := shape("encoder.blocks.0.conv.weight")):
      out["in_channels"] = s[1]
    if (s := shape("quant_conv_mu.conv.weight")):
      out["latent_channels"] = s[0]
    last = max((int(m[1]) for k in state_dict
                if (m := re.fullmatch(r"decoder\.blocks\.(\d+)\.conv\.weight", k))), default=None)
    if last is not None:
      out["out_channels"] = shape(f"decoder.blocks.{last}.conv.weight")[0]
  elif kind == "discriminator":
    if (s := shape("initial_conv.conv.weight")):
      out["channels"], out["in_channels"] = s[0], s[1]
    if (s := shape("final_conv.conv.weight")):
      out["out_channels"] = s[0]
    out["num_layers_d"] = len({m[1] for k in state_dict if (m := re.match(r"(\d+)\.conv\.", k))})
  elif kind == "unet":
    if (s := shape("conv_in.conv.weight")):
      out["in_channels"] = s[1]
    if (s := shape("out.2.conv.weight")):
      out["out_channels"] = s[0]
    cross = [np.shape(v)[1] for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")]
    out["with_conditioning"] = bool(cross)
    out["cross_attention_dim"] = cross[0] if cross else None
  else:
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
  return out


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
      raise fileio.InputError(f"{path}: a {'conditioned' if found['with_conditioning'] else 'unconditioned'}"
                          f" UNet, but config.cond.kind is {config.cond.kind!r}")
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
  flat = traverse_util.flatten_dict(_as_variables(variables))
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
