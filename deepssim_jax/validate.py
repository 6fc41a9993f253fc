"""Config checks run by the entrypoints before any work (nothing read, nothing written).

Values that would crash a job late (a zero logging interval divides by zero after the
first step, zero epochs fail inside grain after the pair table is built) or that make no
sense (negative sizes, fractions outside [0, 1]) are refused at once, every problem of the
config in one ConfigError naming its keys:
"config.train.log_every_steps must be >= 1, got 0".

Documented zero meanings are kept: deepssim's train.eval_every_steps = 0 (once per epoch)
and train.checkpoint_every_steps = 0 (at every evaluation); ldm's train.num_steps = 0
(from num_epochs), train.sample_every_steps = 0 (no sample grids), latent.scale_factor = 0
(from the latents). A field a config does not have is not checked. Unknown fields need no
check here: the entrypoints load configs locked (lock_config=True), so an override of a
field that does not exist is refused while the flags are parsed.
"""

import numbers
from typing import Any, Optional

from deepssim_jax import fileio


class ConfigError(fileio.InputError):
  """A config value (or flag) that a job cannot run with; the message names the key(s).
  `hint`: what to do, printed under the error by the entrypoints (deepssim_jax.cli)."""

  def __init__(self, message: str, hint: Optional[str] = None):
    super().__init__(message)
    self.hint = hint


CONFIG_HINT = "fix the config file or pass --config.<key>=<value>"


_MISSING = object()


def get(config, key: str) -> Any:
  """config.<key> for a dotted key, or _MISSING."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return _MISSING
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _Checker:
  """Collects problems; raise_if_any() raises one ConfigError with all of them."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def value(self, key: str) -> Any:
    return get(self.config, key)

  def fail(self, key: str, what: str, v: Any) -> None:
    self.problems.append(f"config.{key} {what}, got {v!r}")

  def int_min(self, key: str, minimum: int, why: str = "") -> None:
    v = self.value(key)
    if v is _MISSING:
      return
    if not _is_int(v):
      self.fail(key, "must be an integer", v)
    elif v < minimum:
      self.fail(key, f"must be >= {minimum}{why}", v)

  def num_range(self, key: str, lo: float, hi: float, hi_open: bool = False,
                lo_open: bool = False) -> None:
    v = self.value(key)
    if v is _MISSING:
      return
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
      self.fail(key, f"must be in {interval}", v)

  def one_of(self, key: str, choices) -> None:
    v = self.value(key)
    if v is not _MISSING and v not in choices:
      self.fail(key, f"must be one of {list(choices)}", v)

  def num_min(self, key: str, minimum: float, strict: bool = False) -> None:
    v = self.value(key)
    if v is _MISSING:
      return
    if not _is_num(v) or (v <= minimum if strict else v < minimum):
      self.fail(key, f"must be {'>' if strict else '>='} {minimum:g}", v)

  def not_below(self, hi_key: str, lo_key: str) -> None:
    """config.<hi_key> >= config.<lo_key> (the upper and lower ends of one range)."""
    lo, hi = self.value(lo_key), self.value(hi_key)
    if _is_num(lo) and _is_num(hi) and hi < lo:
      self.fail(hi_key, f"must be >= config.{lo_key} ({lo:g})", hi)

  def thresholds(self, key: str) -> None:
    v = self.value(key)
    if v is _MISSING:
      return
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(map(_is_num, v))
        or v[0] > v[1]):
      self.fail(key, "must be (t_low, t_high) with t_low <= t_high", v)

  def image_size(self, key: str) -> None:
    v = self.value(key)
    if v is _MISSING:
      return
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(map(_is_int, v))
        or min(v) < 1):
      self.fail(key, "must be (height, width), two integers >= 1", v)

  def multiple_of_devices(self, key: str, num_devices: int) -> None:
    v = self.value(key)
    if v is _MISSING or not _is_int(v) or v < 1 or num_devices <= 1:
      return
    if v % num_devices:
      self.fail(key, f"must be a multiple of the {num_devices} devices (each device takes an "
                f"equal share of a batch)", v)

  def raise_if_any(self) -> None:
    if self.problems:
      raise ConfigError("; ".join(self.problems), hint=CONFIG_HINT)


# deepssim_jax.main -------------------------------------------------------------------------

_DEEPSSIM_INT_MIN = (
    ("data.num_threads", 0),
    ("pairs.num_pairs", 1), ("pairs.batch_size", 1), ("pairs.balance_bins", 0),
    ("aug.contrast_knots", 2), ("aug.elastic_grid", 2), ("aug.neighbour_grid", 2),
    ("train.batch_size", 1), ("train.eval_batch_size", 1), ("train.num_epochs", 1),
    ("train.log_every_steps", 1),
    ("train.eval_every_steps", 0),        # 0: once per epoch
    ("train.checkpoint_every_steps", 0),  # 0: at every evaluation
    ("train.keep_latest", 1), ("train.num_workers", 0),
    ("optim.warmup_steps", 0),
    ("eval.batch_size", 1), ("eval.chunk", 1), ("eval.carlini_n", 1),
    ("embed.batch_size", 1), ("embed.shard_rows", 1), ("embed.num_threads", 0),
    ("match.k", 1), ("match.q_block", 1), ("match.r_block", 1),
    ("match.full_matrix_max_entries", 1),
    ("audit.k", 1), ("calibrate.mi.rounds", 1), ("calibrate.carlini.n", 1),
    ("report.gallery_size", 0), ("report.gallery_scale", 1), ("report.hist_bins", 1),
    ("report.hist_dpi", 1), ("compare.dpi", 1),
)

# (key, lo, hi, hi_open)
_DEEPSSIM_RANGES = (
    ("data.test_fraction", 0.0, 1.0, True),
    ("pairs.matched_fraction", 0.0, 1.0, False),
    ("pairs.self_fraction", 0.0, 1.0, False),
    ("pairs.valid_fraction", 0.0, 1.0, True),
    ("eval.fit_fraction", 0.0, 1.0, True),
    ("eval.misaligned.p", 0.0, 1.0, False),
    ("aug.p_flip0", 0.0, 1.0, False), ("aug.p_flip1", 0.0, 1.0, False),
    ("aug.p_rotate", 0.0, 1.0, False), ("aug.p_gamma", 0.0, 1.0, False),
    ("aug.p_contrast", 0.0, 1.0, False), ("aug.p_shape", 0.0, 1.0, False),
    ("aug.shape_max_scale", 0.0, 1.0, False), ("aug.shape_max_shear", 0.0, 1.0, False),
    ("aug.shape_max_shift", 0.0, 0.5, False), ("aug.p_blur", 0.0, 1.0, False),
    ("aug.p_elastic", 0.0, 1.0, False), ("aug.contrast_min_range", 0.0, 1.0, False),
    ("aug.p_neighbour", 0.0, 1.0, False), ("aug.p_noise", 0.0, 1.0, False),
    ("calibrate.dar.percentile", 0.0, 100.0, False),
)

# Modes that train, and the batch sizes they split over the devices.
_DEEPSSIM_DEVICE_BATCHES = {"train": ("train.batch_size", "train.eval_batch_size")}


def check_deepssim(config, mode: Optional[str] = None, num_devices: int = 1) -> None:
  """Checks a deepssim_jax config (config_lib.base_config) for `mode`.

  Raises:
    ConfigError: naming every bad key, its rule and its value.
  """
  c = _Checker(config)
  c.image_size("data.image_size")
  for key, minimum in _DEEPSSIM_INT_MIN:
    c.int_min(key, minimum)
  for key, lo, hi, hi_open in _DEEPSSIM_RANGES:
    c.num_range(key, lo, hi, hi_open)
  balance = c.value("pairs.balance_bins")
  if _is_int(balance) and balance > 0:
    c.num_min("pairs.pool_factor", 1.0)  # the pool holds pool_factor x num_pairs pairs
  c.num_min("aug.gamma_min", 0.0, strict=True)
  c.not_below("aug.gamma_max", "aug.gamma_min")
  c.num_min("aug.blur_min_sigma", 0.0, strict=True)
  c.not_below("aug.blur_max_sigma", "aug.blur_min_sigma")
  c.num_min("aug.elastic_max_disp", 0.0)
  c.num_min("aug.neighbour_min_disp", 0.0)
  c.not_below("aug.neighbour_max_disp", "aug.neighbour_min_disp")
  c.num_min("aug.noise_min_sigma", 0.0)
  c.not_below("aug.noise_max_sigma", "aug.noise_min_sigma")
  c.num_min("train.band_weight", 0.0, strict=True)
  c.num_min("train.over_weight", 0.0, strict=True)
  c.thresholds("train.band")
  for key, what in (("aug.p_contrast", "contrast"), ("aug.p_shape", "shape"),
                    ("aug.p_blur", "resolution"), ("aug.p_elastic", "anatomy"),
                    ("aug.p_neighbour", "synthetic-neighbour"), ("aug.p_noise", "noise")):
    p = c.value(key)
    if _is_num(p) and p > 0 and c.value("pairs.align"):
      c.fail(key, f"{what} randomization recomputes plain SSIM targets, so it needs "
             "config.pairs.align=False (aligned targets are not recomputed)", p)
  c.num_min("eval.carlini_alpha", 0.0, strict=True)
  c.thresholds("eval.thresholds")
  c.thresholds("audit.thresholds")
  from deepssim_jax import models  # pylint: disable=g-import-not-at-top
  c.one_of("model.dtype", tuple(models.COMPUTE_DTYPES))
  from deepssim_jax import explain  # pylint: disable=g-import-not-at-top
  c.one_of("explain.method", explain.METHODS)
  scores = c.value("explain.scores")
  if scores is not _MISSING and (isinstance(scores, str)
                                 or any(s not in explain.SCORES for s in scores)):
    c.fail("explain.scores", f"must be a tuple of {list(explain.SCORES)}", scores)
  for key in ("explain.window", "explain.stride", "explain.batch_size",
              "explain.occlusion_batch_size"):
    c.int_min(key, 1)
  c.int_min("model.ensemble", 1)
  k = c.value("model.ensemble")
  if mode == "train" and _is_int(k) and k > 1:
    c.fail("model.ensemble", "must be 1 to train (a run trains one network): train the "
           "members as separate runs, e.g. from other seeds, and join them with python -m "
           "deepssim_jax.pretrained --workdir=A --workdir=B", k)
  for key in _DEEPSSIM_DEVICE_BATCHES.get(mode, ()):
    c.multiple_of_devices(key, num_devices)
  c.raise_if_any()


# ldm_jax.main ------------------------------------------------------------------------------

_LDM_INT_MIN = (
    ("data.num_threads", 0), ("data.max_images", 0),
    ("train.batch_size", 1), ("train.effective_batch_size", 1), ("train.encode_batch_size", 1),
    ("train.num_steps", 0),               # 0: from num_epochs
    ("train.num_epochs", 0),
    ("train.log_every_steps", 1), ("train.checkpoint_every_steps", 1),
    ("train.sample_every_steps", 0),      # 0: no sample grids
    ("train.keep_checkpoints", 1), ("train.num_grid_images", 0),
    ("train.num_grid_samples", 0),
    ("loss.adv_warmup_steps", 0),
    ("latent.pad_multiple", 1),
    ("schedule.num_steps", 1), ("sample.num_inference_steps", 1),
    ("generate.num_samples", 1), ("generate.batch_size", 1),
)

_LDM_TRAINING_MODES = ("autoencoder", "diffusion")


def check_ldm(config, mode: Optional[str] = None, num_devices: int = 1) -> None:
  """Checks an ldm_jax config (autoencoder_config / diffusion_config) for `mode`.

  Raises:
    ConfigError: naming every bad key, its rule and its value.
  """
  c = _Checker(config)
  c.image_size("data.image_size")
  for key, minimum in _LDM_INT_MIN:
    c.int_min(key, minimum)
  steps, epochs = c.value("train.num_steps"), c.value("train.num_epochs")
  if (steps is _MISSING or steps == 0) and epochs == 0:
    c.fail("train.num_epochs", "must be >= 1 when config.train.num_steps is 0 (the run "
           "length comes from one of them)", epochs)
  b, eff = c.value("train.batch_size"), c.value("train.effective_batch_size")
  if _is_int(b) and _is_int(eff) and b >= 1 and eff >= 1 and eff % b:
    c.fail("train.effective_batch_size", f"must be a multiple of config.train.batch_size "
           f"({b}) (gradient accumulation)", eff)
  c.num_min("latent.scale_factor", 0.0)  # 0: from the latents
  t, n = c.value("schedule.num_steps"), c.value("sample.num_inference_steps")
  if _is_int(t) and _is_int(n) and 1 <= t < n:
    c.fail("sample.num_inference_steps", f"must be <= config.schedule.num_steps ({t})", n)
  kind = c.value("autoencoder.kind")
  if kind is not _MISSING:
    from ldm_jax.train_diffusion import FIRST_STAGES  # pylint: disable=g-import-not-at-top
    if kind not in FIRST_STAGES:
      c.fail("autoencoder.kind", f"must be one of {list(FIRST_STAGES)}", kind)
  dup, ranges = c.value("duplication.mode"), c.value("duplication.ranges")
  if dup is not _MISSING and ranges is not _MISSING and dup not in ranges:
    c.fail("duplication.mode", f"must be one of {sorted(ranges)}", dup)
  from ldm_jax import common, diffusion, input_pipeline  # pylint: disable=g-import-not-at-top
  from ldm_jax.train_diffusion import CONDITIONS  # pylint: disable=g-import-not-at-top
  c.one_of("data.intensity", input_pipeline.INTENSITIES)
  c.one_of("latent.pad_mode", diffusion.PAD_MODES)
  c.one_of("cond.kind", CONDITIONS)
  c.one_of("autoencoder.checkpoint", common.CHECKPOINTS)
  c.one_of("generate.checkpoint", common.CHECKPOINTS)
  c.num_range("data.valid_fraction", 0.0, 1.0, hi_open=True)
  c.num_range("train.ema_decay", 0.0, 1.0, hi_open=True)
  if c.value("cond.kind") == "text" and not c.value("data.text_csv"):
    c.fail("data.text_csv", "must name a CSV (key,caption_emb_path) when config.cond.kind is "
           "'text'", c.value("data.text_csv"))
  if mode in _LDM_TRAINING_MODES:
    c.multiple_of_devices("train.batch_size", num_devices)
  c.raise_if_any()

