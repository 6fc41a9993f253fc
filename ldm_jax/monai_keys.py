"""MONAI state-dict keys <-> ldm_jax parameter paths, as data: one table of rows per network.

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

`from_monai(kind, state_dict, target)` checks a state dict (in memory) against the keys and
shapes the target network has (`abstract_variables(kind, model)`: jax.eval_shape of its
init, through the rows) and raises InputError naming every unknown, missing and mis-shaped
key; `to_monai(kind, variables)` is its inverse. `is_old_style` recognises the older names
of MONAI Generative 0.2.x (OLD_STYLE), which ldm_jax/convert.py renames before mapping, and
`infer_overrides` reads network settings off single tensors. kind: autoencoder,
discriminator or unet. Nothing here reads files or needs MONAI; torch only for
to_monai(as_torch=True). Files, old names, run workdirs and the command line are
ldm_jax/convert.py's.
"""

import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deepssim_jax import fileio

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
  flat = traverse_util.flatten_dict(as_variables(variables))
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


def as_variables(tree: Any) -> dict:
  """A variables dict ({"params": ..., ["batch_stats": ...]}) from variables or bare params."""
  tree = dict(tree)
  if tree and set(tree) <= {"params", "batch_stats"}:
    return tree
  return {"params": tree}


def to_numpy(value: Any) -> np.ndarray:
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
      model.state_dict() (old MONAI Generative names: convert.upgrade_old_keys first).
    target: the network's variables or their shapes, e.g. abstract_variables(kind, model).
    source: what to call the state dict in messages (the file).

  Returns:
    Variables {"params": ...} ("batch_stats" too for the discriminator) with the target's
    structure and dtypes; the values are exact copies.

  Raises:
    InputError: naming the source and every unknown, missing and mis-shaped key (in MONAI's
      names, with both shapes).
  """
  state = {k: to_numpy(v) for k, v in state_dict.items()}
  expected = _monai_keys(kind, target)
  flat_target = traverse_util.flatten_dict(as_variables(target))
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
  variables = as_variables(variables)
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for k, (path, transform) in _monai_keys(kind, variables).items():
    out[k] = (np.zeros((), np.int64) if path is None else  # a writable copy, for torch
              np.array(TRANSFORMS[transform][1](np.asarray(flat[path])), order="C"))
  if as_torch:
    import torch  # pylint: disable=g-import-not-at-top
    out = {k: torch.from_numpy(v) for k, v in out.items()}
  return out


# ----------------------------------------------------------------------------- targets


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
