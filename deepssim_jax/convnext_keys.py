"""Torch ConvNeXt / DeepSSIM state-dict keys <-> our parameter paths, as data.

Sources, each a named format of FORMATS:
  torchvision  torchvision ConvNeXt state dicts (`convnext_{tiny,small,base,large}`): the
               ImageNet init of the paper.
  timm         timm ConvNeXt state dicts.
  wacv         the reference's released embedding net (ImageEmbedder: convnext features ->
               average pool -> BatchNorm1d -> Linear -> GELU -> Dropout -> Linear).
  pp           DeepSSIM++'s embedding net (ConvNeXt-Tiny in four `stage_*` parts, a GeM per
               stage, LayerNorm -> Linear -> GELU -> Dropout -> Linear).
Every format first renames its keys to torchvision's `features.<i>...` spelling (plus
`fc.*` / `gem_*` head keys), then one table of rows (key pattern, our path, transform)
maps them (`map_keys`, naming every key no row takes); `infer_model` reads the architecture
off the key names and shapes. Back the other way, `torchvision_name` and `to_torchvision`
invert the backbone rows, and the reference's freezing rule (`reference_freeze_mask`) is
applied to those names. Nothing here reads files or needs torch: files, checking against a
model and checkpoints are deepssim_jax/convert.py's.
"""

import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from deepssim_jax import fileio, models

StateDict = Dict[str, np.ndarray]

# ----------------------------------------------------------------------------- transforms

TRANSFORMS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # OIHW -> HWIO
    "linear": lambda w: np.transpose(w),             # (out, in) -> (in, out)
    "vector": lambda w: np.reshape(w, (-1,)),        # (C, 1, 1) layer scale -> (C,)
    "same": lambda w: w,
}

_CONV = {"weight": "kernel", "bias": "bias"}
_NORM = {"weight": "scale", "bias": "bias"}


def _p(*path):
  return ("params",) + path


# A row: (regex over the canonical key, fn(match) -> our path or None, transform).
# Canonical backbone keys are torchvision's: features.0 stem (conv, LayerNorm2d),
# features.2i+1 stage i blocks, features.2i (i >= 1) the downsampling in front of stage i
# (LayerNorm2d, conv). Our stage i owns that downsampling (models.py).
def _stage(m, odd: bool):
  i = int(m["i"])
  if i == 0 or (i % 2 == 1) != odd:
    return None
  return (i - 1) // 2 if odd else i // 2


_BLOCK_PARTS = {"block.0": ("dwconv", _CONV, "conv"), "block.2": ("norm", _NORM, "same"),
                "block.3": ("pwconv1", _CONV, "linear"), "block.5": ("pwconv2", _CONV, "linear")}


def _block(m):
  s = _stage(m, odd=True)
  if s is None:
    return None
  name, leaf, _ = _BLOCK_PARTS[m["part"]]
  return _p("backbone", f"stages_{s}", f"block_{m['j']}", name, leaf[m["wb"]])


def _downsample(m):
  s = _stage(m, odd=False)
  if s is None:
    return None
  name, leaf = ("norm", _NORM) if m["k"] == "0" else ("conv", _CONV)
  return _p("backbone", f"stages_{s}", "downsample", name, leaf[m["wb"]])


BACKBONE_ROWS = (
    (r"features\.0\.0\.(?P<wb>weight|bias)", lambda m: _p("backbone", "stem", "conv",
                                                          _CONV[m["wb"]]), "conv"),
    (r"features\.0\.1\.(?P<wb>weight|bias)", lambda m: _p("backbone", "stem", "norm",
                                                          _NORM[m["wb"]]), "same"),
    (r"features\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<part>block\.0)\.(?P<wb>weight|bias)", _block, "conv"),
    (r"features\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<part>block\.2)\.(?P<wb>weight|bias)", _block, "same"),
    (r"features\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<part>block\.[35])\.(?P<wb>weight|bias)", _block,
     "linear_or_bias"),
    (r"features\.(?P<i>\d+)\.(?P<j>\d+)\.layer_scale",
     lambda m: None if _stage(m, True) is None else
     _p("backbone", f"stages_{_stage(m, True)}", f"block_{m['j']}", "layer_scale"), "vector"),
    (r"features\.(?P<i>\d+)\.(?P<k>[01])\.(?P<wb>weight|bias)", _downsample, "conv_if_k1"),
)

WACV_HEAD_ROWS = (
    (r"fc\.2\.(?P<wb>weight|bias)", lambda m: _p("head", "bn", _NORM[m["wb"]]), "same"),
    (r"fc\.2\.running_mean", lambda m: ("batch_stats", "head", "bn", "mean"), "same"),
    (r"fc\.2\.running_var", lambda m: ("batch_stats", "head", "bn", "var"), "same"),
    (r"fc\.3\.(?P<wb>weight|bias)", lambda m: _p("head", "hidden", _CONV[m["wb"]]),
     "linear_or_bias"),
    (r"fc\.6\.(?P<wb>weight|bias)", lambda m: _p("head", "embed", _CONV[m["wb"]]),
     "linear_or_bias"),
)

GEM_HEAD_ROWS = (
    (r"gem_(?P<s>[abcd])\.p", lambda m: _p("head", f"gem_{'abcd'.index(m['s'])}"), "same"),
    (r"fc\.0\.(?P<wb>weight|bias)", lambda m: _p("head", "norm", _NORM[m["wb"]]), "same"),
    (r"fc\.1\.(?P<wb>weight|bias)", lambda m: _p("head", "hidden", _CONV[m["wb"]]),
     "linear_or_bias"),
    (r"fc\.4\.(?P<wb>weight|bias)", lambda m: _p("head", "embed", _CONV[m["wb"]]),
     "linear_or_bias"),
)


def _transform(kind: str, key: str, value: np.ndarray) -> np.ndarray:
  if kind == "linear_or_bias":
    kind = "linear" if key.endswith("weight") else "same"
  elif kind == "conv_if_k1":  # downsampling: .0 is the LayerNorm, .1 the conv
    kind = "conv" if re.search(r"\.1\.weight$", key) else "same"
  elif kind == "conv" and key.endswith("bias"):
    kind = "same"
  return TRANSFORMS[kind](value)


# ----------------------------------------------------------------------------- formats
# Each format renames its keys to the canonical spelling; None drops a key on purpose.


def _rename_torchvision(key: str) -> Optional[str]:
  if key.startswith("classifier."):  # ImageNet head (LayerNorm2d, Linear 1000): not ours
    return None
  return key if key.startswith("features.") else "!" + key


def _rename_timm(key: str) -> Optional[str]:
  if key.startswith(("head.", "norm_pre.")):
    return None
  m = re.fullmatch(r"stem\.(\d)\.(.*)", key)
  if m:
    return f"features.0.{m[1]}.{m[2]}"
  m = re.fullmatch(r"stages\.(\d+)\.downsample\.(\d)\.(.*)", key)
  if m:
    return f"features.{2 * int(m[1])}.{m[2]}.{m[3]}"
  m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
  if m:
    parts = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3",
             "mlp.fc2": "block.5"}
    rest = m[3]
    if rest == "gamma":
      return f"features.{2 * int(m[1]) + 1}.{m[2]}.layer_scale"
    for theirs, ours in parts.items():
      if rest.startswith(theirs + "."):
        return f"features.{2 * int(m[1]) + 1}.{m[2]}.{ours}{rest[len(theirs):]}"
  return "!" + key


def _rename_wacv(key: str) -> Optional[str]:
  if key.endswith("num_batches_tracked"):
    return None
  if key.startswith("feature_extractor."):
    return "features." + key[len("feature_extractor."):]
  return key


def _rename_pp(key: str) -> Optional[str]:
  m = re.fullmatch(r"stage_([abcd])\.(\d)\.(.*)", key)
  if m:  # stage_a = features[0:2], stage_b = features[2:4], ...
    return f"features.{2 * 'abcd'.index(m[1]) + int(m[2])}.{m[3]}"
  return key


FORMATS: Dict[str, dict] = {
    "torchvision": {"rename": _rename_torchvision, "rows": BACKBONE_ROWS, "head": None},
    "timm": {"rename": _rename_timm, "rows": BACKBONE_ROWS, "head": None},
    "wacv": {"rename": _rename_wacv, "rows": BACKBONE_ROWS + WACV_HEAD_ROWS, "head": "wacv"},
    "pp": {"rename": _rename_pp, "rows": BACKBONE_ROWS + GEM_HEAD_ROWS, "head": "gem"},
}


def detect_format(keys: Sequence[str]) -> str:
  """The format a set of state-dict keys is in."""
  keys = set(keys)
  if any(k.startswith("stage_a.") for k in keys):
    return "pp"
  if any(k.startswith("feature_extractor.") for k in keys):
    return "wacv"
  if any(k.startswith("stages.") for k in keys):
    return "timm"
  if any(k.startswith("features.") for k in keys):
    return "torchvision"
  raise fileio.InputError("unrecognised state dict: none of the ConvNeXt key prefixes "
                      "(features., feature_extractor., stage_a., stages.) is present; e.g. "
                      f"{sorted(keys)[:5]}")


def map_keys(state: StateDict, fmt: str) -> Dict[Tuple[str, ...], np.ndarray]:
  """Applies a format's renaming and rows: {our flat path: converted array}.

  Raises:
    InputError: a key no row maps (named), or two keys mapping to one path.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
  spec = FORMATS[fmt]
  rows = [(re.compile(pat), fn, kind) for pat, fn, kind in spec["rows"]]
  out, unknown = {}, []
  for key, value in state.items():
    canon = spec["rename"](key)
    if canon is None:
      continue
    path = None
    for pat, fn, kind in rows:
      m = pat.fullmatch(canon)
      if m and (path := fn(m)) is not None:
        break
    if path is None:
      unknown.append(key)
      continue
    if path in out:
      raise fileio.InputError(f"key {key!r} maps to {'/'.join(path)}, already filled")
    out[path] = _transform(kind, canon, np.asarray(value, np.float32))
  if unknown:
    raise fileio.InputError(f"{len(unknown)} unknown key(s) for format {fmt!r}: {unknown[:8]}")
  return out


# ----------------------------------------------------------------------------- architecture


def infer_model(state: StateDict, fmt: str) -> dict:
  """make_model() arguments that reproduce the network a state dict holds."""
  spec = FORMATS[fmt]
  canon = {spec["rename"](k): np.shape(v) for k, v in state.items()}
  depths, dims = [], []
  for s in range(4):
    blocks = {int(m[1]) for k in canon if k and (m := re.fullmatch(
        rf"features\.{2 * s + 1}\.(\d+)\.block\.0\.weight", k))}
    if not blocks:
      break
    if blocks != set(range(len(blocks))):
      raise fileio.InputError(f"stage {s}: block indices {sorted(blocks)} are not 0..n-1")
    depths.append(len(blocks))
    dims.append(canon[f"features.{2 * s + 1}.0.block.0.weight"][0])
  if not depths:
    raise fileio.InputError(f"no ConvNeXt blocks found in the {fmt} state dict")
  name = next((n for n, f in models.MODELS.items()
               if tuple(f.keywords["depths"]) == tuple(depths)
               and tuple(f.keywords["dims"]) == tuple(dims)), None)
  kw = {"head": spec["head"] or "wacv"}
  if name is None:
    name, kw["depths"], kw["dims"] = "convnext_base", tuple(depths), tuple(dims)
  kw["name"] = name
  if spec["head"] == "wacv":
    kw["hidden_dim"], kw["embed_dim"] = canon["fc.3.weight"][0], canon["fc.6.weight"][0]
  elif spec["head"] == "gem":
    kw["hidden_dim"], kw["embed_dim"] = canon["fc.1.weight"][0], canon["fc.4.weight"][0]
  return kw


# ----------------------------------------------------------------------------- back to torchvision


def torchvision_name(path: Sequence[str]) -> Optional[str]:
  """Our backbone parameter path -> torchvision's `features` parameter name (inverse rows).

  E.g. (stages_1, block_0, pwconv1, kernel) -> '3.0.block.3.weight'. None outside the
  backbone.
  """
  path = tuple(path)
  if path[:1] == ("backbone",):
    path = path[1:]
  wb = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  if path[:1] == ("stem",):
    return f"0.{0 if path[1] == 'conv' else 1}.{wb[path[2]]}"
  if not path or not path[0].startswith("stages_"):
    return None
  s = int(path[0].split("_")[1])
  if path[1] == "downsample":
    return f"{2 * s}.{0 if path[2] == 'norm' else 1}.{wb[path[3]]}"
  j = path[1].split("_")[1]
  if path[2] == "layer_scale":
    return f"{2 * s + 1}.{j}.layer_scale"
  part = {"dwconv": 0, "norm": 2, "pwconv1": 3, "pwconv2": 5}[path[2]]
  return f"{2 * s + 1}.{j}.block.{part}.{wb[path[3]]}"


def reference_rule(name: str) -> bool:
  """The reference's freezing test on a torchvision `features` parameter name: it meant to
  freeze the first two stages, but freezes every name containing the character 0 or 1."""
  return "0" in name or "1" in name


def reference_freeze_mask(params: Any) -> Any:
  """True for trainable leaves under the reference's rule (the head always trains)."""
  flat = traverse_util.flatten_dict(dict(params))
  out = {}
  for path in flat:
    name = torchvision_name(path) if path[0] == "backbone" else None
    out[path] = name is None or not reference_rule(name)
  return traverse_util.unflatten_dict(out)


_INVERSE = {"conv": lambda w: np.transpose(w, (3, 2, 0, 1)), "linear": np.transpose,
            "vector": lambda w: np.reshape(w, (-1, 1, 1)), "same": lambda w: w}


def to_torchvision(backbone: Any) -> StateDict:
  """Our backbone params -> a torchvision `convnext_*` state dict (`features.*` keys, torch
  layouts): the inverse of the torchvision rows, e.g. to save ours with safetensors."""
  out = {}
  for path, v in traverse_util.flatten_dict(dict(backbone)).items():
    name = torchvision_name(path)
    v = np.asarray(v, np.float32)
    if path[-1] == "layer_scale":
      kind = "vector"
    elif path[-1] == "kernel":
      kind = "linear" if path[-2].startswith("pwconv") else "conv"
    else:
      kind = "same"
    out["features." + name] = np.ascontiguousarray(_INVERSE[kind](v))
  return out
