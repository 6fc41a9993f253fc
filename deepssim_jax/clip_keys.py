"""open_clip state dict keys -> deepssim_jax.clip.CLIPVision's variables.

open_clip checkpoints (open_clip_pytorch_model.bin / open_clip_model.safetensors, or a
training checkpoint's state_dict under DDP's `module.`) hold the image tower under `visual.`
beside the text tower (`transformer.*`, `token_embedding`, the text `positional_embedding`,
`text_projection`, `logit_scale`), which is ignored; the tower's own state dict
(`model.visual.state_dict()`) has the same keys without the prefix.
"""

import math
import re
from typing import Dict, Tuple

import numpy as np

from deepssim_jax import fileio

# (torch key pattern, our path template under "params", rank of the torch array, transform).
# The pattern's groups (a block index, a layer name) fill "{0}", "{1}" in the template.
_OIHW = lambda w: np.transpose(w, (2, 3, 1, 0))
_T = np.transpose
_ID = lambda w: w
_B = r"transformer\.resblocks\.(\d+)\."
KEY_TABLE = [
    (r"conv1\.weight", ("conv1", "kernel"), 4, _OIHW),
    (r"class_embedding", ("class_embedding",), 1, _ID),
    (r"positional_embedding", ("positional_embedding",), 2, _ID),
    (r"proj", ("proj",), 2, _ID),
    (r"(ln_pre|ln_post)\.weight", ("{0}", "scale"), 1, _ID),
    (r"(ln_pre|ln_post)\.bias", ("{0}", "bias"), 1, _ID),
    (_B + r"(ln_1|ln_2)\.weight", ("resblocks_{0}", "{1}", "scale"), 1, _ID),
    (_B + r"(ln_1|ln_2)\.bias", ("resblocks_{0}", "{1}", "bias"), 1, _ID),
    (_B + r"attn\.in_proj_weight", ("resblocks_{0}", "attn", "in_proj", "kernel"), 2, _T),
    (_B + r"attn\.in_proj_bias", ("resblocks_{0}", "attn", "in_proj", "bias"), 1, _ID),
    (_B + r"attn\.out_proj\.weight", ("resblocks_{0}", "attn", "out_proj", "kernel"), 2, _T),
    (_B + r"attn\.out_proj\.bias", ("resblocks_{0}", "attn", "out_proj", "bias"), 1, _ID),
    (_B + r"mlp\.(c_fc|c_proj)\.weight", ("resblocks_{0}", "{1}", "kernel"), 2, _T),
    (_B + r"mlp\.(c_fc|c_proj)\.bias", ("resblocks_{0}", "{1}", "bias"), 1, _ID),
]


def _tower(state: Dict[str, np.ndarray]) -> Tuple[str, Dict[str, np.ndarray]]:
  """(the prefix stripped, the image tower's keys without it)."""
  prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
  if any(k.startswith(prefix + "visual.") for k in state):
    prefix += "visual."
  return prefix, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def visual_state(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The image tower's keys without `visual.`: a whole open_clip checkpoint (text tower,
  logit_scale ... ignored; also under DDP's `module.`) or the tower's own state dict."""
  return _tower(state)[1]


def map_keys(state: Dict[str, np.ndarray]) -> Tuple[Dict[Tuple[str, ...], np.ndarray], list]:
  """({our flat path under 'params': array}, [the file's keys no row matched or of the wrong
  rank])."""
  out, unknown = {}, []
  prefix, tower = _tower(state)
  for k, a in tower.items():
    for pat, path, rank, f in KEY_TABLE:
      m = re.fullmatch(pat, k)
      if m:
        a = np.asarray(a, np.float32)
        if a.ndim != rank:
          unknown.append(f"{prefix}{k} (shape {a.shape})")
        else:
          out[("params", *(s.format(*m.groups()) for s in path))] = f(a)
        break
    else:
      unknown.append(prefix + k)
  return out, unknown


def infer_config(state: Dict[str, np.ndarray], head_width: int = 64) -> dict:
  """CLIPVision's sizes read off a state dict's shapes; heads = width // head_width (64 in
  every open_clip ViT config: shapes do not tell heads apart)."""
  s = visual_state(state)
  try:
    width, _, p, _ = np.shape(s["conv1.weight"])
    grid = math.isqrt(np.shape(s["positional_embedding"])[0] - 1)
    layers = 1 + max(int(m.group(1)) for k in s
                     if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    embed_dim = np.shape(s["proj"])[1]
  except (KeyError, ValueError, IndexError) as e:
    raise fileio.InputError(f"not an open_clip ViT image tower ({type(e).__name__}: {e})") \
        from None
  return dict(width=int(width), layers=layers, heads=max(1, int(width) // head_width),
              patch_size=int(p), image_size=grid * int(p), embed_dim=int(embed_dim))
