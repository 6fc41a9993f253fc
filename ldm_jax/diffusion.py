"""Diffusion maths of the latent diffusion model: a schedule as data, steps as pure functions.

The reference trains its UNet with MONAI's DDPMScheduler (1000 steps, "scaled linear" betas
0.0015 -> 0.0205) and samples with MONAI's DDIMScheduler (50 steps, eta 0, no clipping). Here
the schedule is a frozen pytree of precomputed arrays (`Schedule`) and everything else is a
pure function of it, as in google-research/vdm: `q_sample` (forward noising), `ddpm_loss`
(noise-prediction MSE), `ddpm_step` / `ddim_step` (one reverse step, MONAI's formulas) and
`ddim_sample` (the whole reverse chain as one jit-compiled `lax.scan`). The UNet knows nothing
about schedules: the functions here take `apply_fn(params, x_t, t, context) -> predicted noise`.

Conventions: images are channels-last (B, H, W, C) (any rank works: per-sample coefficients
are broadcast over every axis after the first); timesteps are integers in [0, T). Only epsilon
prediction is offered (the reference's choice).

Choices where MONAI and the literature differ (all documented on the functions):
- Schedules are computed in float64 on the host, then stored as float32 (MONAI computes in
  float32; alpha-bar differs by < 1e-6).
- "cosine" is Nichol & Dhariwal's (betas from the alpha-bar ratio, capped at 0.999, and
  alpha-bar recomputed as their cumulative product), not MONAI's variant whose alpha-bar
  starts at exactly 1 and disagrees with its own betas.
- DDIM's last step uses alpha-bar_prev = 1 (MONAI's default set_alpha_to_one=True).
- DDIM's timesteps default to MONAI Generative 0.2.x's (980, 960, ..., 0: the reference's);
  MONAI 1.6 spaces them as round(linspace(999, 0, n)) (`spacing="linspace"`).

Latents of 34 x 28 do not divide by the UNet's 2^(levels - 1) = 4: `pad_to_multiple` zero-pads
H and W at the end (34 x 28 -> 36 x 28, as the reference does) and `crop_to` undoes it.

The module is long for one idea (a schedule and pure functions of it) because each step
carries the MONAI formula it reproduces and the deviations listed above, next to its code.
"""

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ApplyFn = Callable[[Any, Array, Array, Optional[Array]], Array]


@struct.dataclass
class Schedule:
  """Precomputed arrays of a discrete diffusion schedule, all float32 of shape (T,).

  A pytree: pass it to jitted functions as an argument (or close over it as a constant).

  Attributes:
    betas: beta_t, the per-step noise variance.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha-bar_{t-1}, with alpha-bar_{-1} = 1.
    sqrt_alphas_cumprod: sqrt(alpha-bar_t), the signal scale of x_t.
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha-bar_t), the noise scale of x_t.
    posterior_variance: variance of q(x_{t-1} | x_t, x_0),
      beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) (0 at t = 0).
    posterior_mean_coef_x0: coefficient of x_0 in that posterior's mean.
    posterior_mean_coef_xt: coefficient of x_t in that posterior's mean.
  """
  betas: Array
  alphas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  posterior_variance: Array
  posterior_mean_coef_x0: Array
  posterior_mean_coef_xt: Array

  @property
  def num_steps(self) -> int:
    """T, the number of training timesteps (static: read from the arrays' shape)."""
    return self.betas.shape[0]


def _linear_betas(num_steps, beta_start, beta_end, cosine_s, max_beta):
  del cosine_s, max_beta
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def _scaled_linear_betas(num_steps, beta_start, beta_end, cosine_s, max_beta):
  del cosine_s, max_beta
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2


def _cosine_betas(num_steps, beta_start, beta_end, cosine_s, max_beta):
  # Nichol & Dhariwal 2021, eq. 17: alpha-bar(t) = f(t) / f(0),
  # f(t) = cos^2(pi/2 (t/T + s) / (1 + s)); beta_t = 1 - alpha-bar(t+1) / alpha-bar(t), capped.
  del beta_start, beta_end
  f = np.cos((np.arange(num_steps + 1, dtype=np.float64) / num_steps + cosine_s)
             / (1 + cosine_s) * np.pi / 2) ** 2
  return np.minimum(1 - f[1:] / f[:-1], max_beta)


# Beta schedules by name: fn(num_steps, beta_start, beta_end, cosine_s, max_beta) -> float64 (T,).
BETA_SCHEDULES: Dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "cosine": _cosine_betas,
}


def make_schedule(num_steps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0205,
                  kind: str = "scaled_linear", cosine_s: float = 0.008,
                  max_beta: float = 0.999) -> Schedule:
  """Builds a Schedule (the reference's: 1000 steps, scaled linear 0.0015 -> 0.0205).

  Args:
    num_steps: T, the number of training timesteps.
    beta_start: beta_0 (linear kinds only).
    beta_end: beta_{T-1} (linear kinds only).
    kind: a key of BETA_SCHEDULES: "linear" (betas = linspace(b0, b1, T)), "scaled_linear"
      (betas = linspace(sqrt b0, sqrt b1, T)^2, MONAI's/diffusers') or "cosine" (Nichol &
      Dhariwal 2021).
    cosine_s: the cosine schedule's offset s.
    max_beta: the cosine schedule's cap on beta_t.

  Returns:
    The Schedule, computed in float64 and stored as float32.

  Raises:
    ValueError: for an unknown kind or betas outside (0, 1).
  """
  if kind not in BETA_SCHEDULES:
    raise ValueError(f"make_schedule: unknown kind {kind!r}; choose one of "
                     f"{sorted(BETA_SCHEDULES)}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"make_schedule: num_steps must be a positive integer, got {num_steps}")
  betas = BETA_SCHEDULES[kind](int(num_steps), beta_start, beta_end, cosine_s, max_beta)
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"make_schedule: {kind} betas must lie in (0, 1), got range "
                     f"[{betas.min()}, {betas.max()}] (beta_start={beta_start}, "
                     f"beta_end={beta_end})")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas), alphas=f32(alphas), alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev), sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      posterior_variance=f32(betas * (1.0 - abar_prev) / (1.0 - abar)),
      posterior_mean_coef_x0=f32(np.sqrt(abar_prev) * betas / (1.0 - abar)),
      posterior_mean_coef_xt=f32(np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar)))


def _per_sample(values: Array, ndim: int) -> Array:
  """Reshapes a scalar or (B,) coefficient to broadcast over a rank-`ndim` batch."""
  values = jnp.asarray(values)
  return values if values.ndim == 0 else values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """Noises x0 to timestep t: x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise.

  MONAI's Scheduler.add_noise.

  Args:
    schedule: the Schedule.
    x0: clean samples (B, ...).
    t: integer timesteps, (B,) or a scalar.
    noise: standard normal noise, x0's shape.

  Returns:
    x_t, x0's shape.
  """
  t = jnp.asarray(t)
  a = _per_sample(schedule.sqrt_alphas_cumprod[t], x0.ndim)
  s = _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x0.ndim)
  return a * x0 + s * noise


def ddpm_loss(apply_fn: ApplyFn, params: Any, schedule: Schedule, x0: Array, rng: Array,
              context: Optional[Array] = None) -> Array:
  """The DDPM training loss: MSE between the model's predicted noise and the true noise.

  Each sample gets its own timestep t ~ U{0, ..., T-1} and noise ~ N(0, I); the mean is over
  every element (PyTorch's F.mse_loss, the reference's). Pure: differentiate it with
  jax.grad with respect to params.

  Args:
    apply_fn: apply_fn(params, x_t, t, context) -> predicted noise, x_t's shape.
    params: the model's variables, passed through to apply_fn.
    schedule: the Schedule.
    x0: clean samples (B, ...) (latents, for the LDM).
    rng: a PRNG key for t and the noise.
    context: optional conditioning, passed through to apply_fn.

  Returns:
    The scalar float32 loss.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32).astype(x0.dtype)
  return ddpm_loss_from(apply_fn, params, schedule, x0, noise, t, context)


def ddpm_loss_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, x0: Array, noise: Array,
                   t: Array, context: Optional[Array] = None) -> Array:
  """ddpm_loss for given noise and timesteps (MONAI's DiffusionInferer + F.mse_loss).

  Args:
    apply_fn: apply_fn(params, x_t, t, context) -> predicted noise, x_t's shape.
    params: the model's variables, passed through to apply_fn.
    schedule: the Schedule.
    x0: clean samples (B, ...).
    noise: the noise added to x0, x0's shape and dtype.
    t: integer timesteps (B,).
    context: optional conditioning, passed through to apply_fn.

  Returns:
    The scalar float32 mean squared error between the predicted and the true noise.
  """
  pred = apply_fn(params, q_sample(schedule, x0, t, noise), t, context)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise.astype(jnp.float32)))


def predict_x0(schedule: Schedule, model_output: Array, t: Array, x_t: Array) -> Array:
  """x_0 implied by a noise prediction: (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t).

  Args:
    schedule: the Schedule.
    model_output: predicted noise eps, x_t's shape.
    t: integer timesteps, (B,) or a scalar.
    x_t: noisy samples (B, ...).

  Returns:
    The predicted x_0 (not clipped), x_t's shape.
  """
  t = jnp.asarray(t)
  a = _per_sample(schedule.sqrt_alphas_cumprod[t], x_t.ndim)
  s = _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x_t.ndim)
  return (x_t - s * model_output) / a


def ddpm_step(schedule: Schedule, model_output: Array, t: Array, x_t: Array,
              rng: Array) -> Array:
  """One ancestral DDPM step x_t -> x_{t-1} (MONAI's DDPMScheduler.step).

  Settings: epsilon prediction, variance_type "fixed_small" (the posterior variance, clamped
  at 1e-20), clip_sample False. x_{t-1} = posterior mean(pred x_0, x_t) + sqrt(var) z, with no
  noise at t = 0.

  Args:
    schedule: the Schedule.
    model_output: predicted noise, x_t's shape.
    t: integer timesteps, (B,) or a scalar (may be traced).
    x_t: noisy samples (B, ...).
    rng: a PRNG key for z.

  Returns:
    x_{t-1}, x_t's shape.
  """
  t = jnp.asarray(t)
  x0 = predict_x0(schedule, model_output, t, x_t)
  mean = (_per_sample(schedule.posterior_mean_coef_x0[t], x_t.ndim) * x0
          + _per_sample(schedule.posterior_mean_coef_xt[t], x_t.ndim) * x_t)
  std = jnp.sqrt(jnp.maximum(schedule.posterior_variance[t], 1e-20))
  std = _per_sample(jnp.where(t > 0, std, 0.0), x_t.ndim)
  z = jax.random.normal(rng, x_t.shape, jnp.float32)
  return (mean + std * z).astype(x_t.dtype)


def ddim_timesteps(num_train_steps: int = 1000, num_inference_steps: int = 50,
                   steps_offset: int = 0, spacing: str = "leading") -> np.ndarray:
  """DDIM's descending timesteps (MONAI's DDIMScheduler.set_timesteps).

  spacing "leading" (MONAI Generative 0.2.x, the reference's, and MONAI up to 1.5):
  step_ratio = T // n; timesteps = arange(n)[::-1] * step_ratio + steps_offset
  (T = 1000, n = 50: 980, 960, ..., 0).
  spacing "linspace" (MONAI 1.6, Project-MONAI/MONAI#8623):
  round(linspace(T - 1 - steps_offset, 0, n)) + steps_offset (999, 979, 958, ..., 0).
  Either way MONAI's step goes from t to t - T // n (not to the next timestep).

  Args:
    num_train_steps: T.
    num_inference_steps: n, at most T.
    steps_offset: added to every timestep; must be below step_ratio ("leading") or T
      ("linspace").
    spacing: "leading" or "linspace".

  Returns:
    int32 numpy array (n,), descending.

  Raises:
    ValueError: for n outside [1, T], an out-of-range steps_offset or an unknown spacing.
  """
  if not 1 <= num_inference_steps <= num_train_steps:
    raise ValueError(f"ddim_timesteps: num_inference_steps must be in [1, {num_train_steps}] "
                     f"(the training steps), got {num_inference_steps}")
  if spacing == "linspace":
    if not 0 <= steps_offset < num_train_steps:
      raise ValueError(f"ddim_timesteps: steps_offset must be in [0, {num_train_steps}), got "
                       f"{steps_offset}")
    ts = np.round(np.linspace(num_train_steps - 1 - steps_offset, 0, num_inference_steps))
    return (ts + steps_offset).astype(np.int32)
  if spacing != "leading":
    raise ValueError(f"ddim_timesteps: spacing must be 'leading' or 'linspace', got {spacing!r}")
  ratio = num_train_steps // num_inference_steps
  if not 0 <= steps_offset < ratio:
    raise ValueError(f"ddim_timesteps: steps_offset must be in [0, {ratio}) "
                     f"(num_train_steps // num_inference_steps), got {steps_offset}")
  return (np.arange(num_inference_steps)[::-1] * ratio + steps_offset).astype(np.int32)


def ddim_step(schedule: Schedule, model_output: Array, t: Array, prev_t: Array, x_t: Array,
              eta: float = 0.0, rng: Optional[Array] = None,
              final_alpha_cumprod: float = 1.0) -> Tuple[Array, Array]:
  """One DDIM step x_t -> x_{prev_t} (MONAI's DDIMScheduler.step, Song et al. eq. 12 and 16).

  Epsilon prediction, no clipping. With sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)
  (1 - abar_t / abar_prev)):
    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
  eta = 0 is deterministic (no rng needed).

  Args:
    schedule: the Schedule.
    model_output: predicted noise eps, x_t's shape.
    t: integer timesteps, (B,) or a scalar (may be traced).
    prev_t: the previous timestep(s) (t - T // n in the sampler); negative means "before
      step 0", where alpha-bar_prev = final_alpha_cumprod.
    x_t: noisy samples (B, ...).
    eta: stochasticity (0: DDIM, 1: DDPM-like variance).
    rng: PRNG key for z; required when eta is not 0.
    final_alpha_cumprod: alpha-bar before step 0 (MONAI's set_alpha_to_one=True: 1.0; use
      alphas_cumprod[0] for set_alpha_to_one=False).

  Returns:
    (x_prev, pred_x0), each x_t's shape.

  Raises:
    ValueError: eta is a nonzero number and rng is None.
  """
  t, prev_t = jnp.asarray(t), jnp.asarray(prev_t)
  abar_t = schedule.alphas_cumprod[t]
  abar_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)],
                        final_alpha_cumprod)
  x0 = predict_x0(schedule, model_output, t, x_t)
  variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
  sigma = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma ** 2, 0.0))
  x_prev = (_per_sample(jnp.sqrt(abar_prev), x_t.ndim) * x0
            + _per_sample(direction, x_t.ndim) * model_output)
  if rng is not None:
    x_prev = x_prev + _per_sample(sigma, x_t.ndim) * jax.random.normal(rng, x_t.shape,
                                                                       jnp.float32)
  elif isinstance(eta, (int, float)) and eta != 0:
    raise ValueError(f"ddim_step: eta={eta} adds noise and needs an rng key")
  return x_prev.astype(x_t.dtype), x0.astype(x_t.dtype)


@functools.partial(jax.jit, static_argnames=("apply_fn", "shape", "num_inference_steps", "eta",
                                             "final_alpha_cumprod", "spacing"))
def ddim_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, shape: Sequence[int],
                rng: Array, num_inference_steps: int = 50, eta: float = 0.0,
                context: Optional[Array] = None, final_alpha_cumprod: float = 1.0,
                x_T: Optional[Array] = None, spacing: str = "leading") -> Array:
  """Samples with DDIM from x_T ~ N(0, I): the whole chain is one compiled `lax.scan`.

  Timesteps are ddim_timesteps(T, num_inference_steps, spacing=spacing); each step goes from
  t to t - T // num_inference_steps (MONAI's sampler; the reference: 50 steps, eta 0). apply_fn
  is a static argument: pass the same function object each call (e.g. `model.apply`) so the
  program compiles once.

  Args:
    apply_fn: apply_fn(params, x_t, t, context) -> predicted noise; t is (B,) int32.
    params: the model's variables.
    schedule: the Schedule.
    shape: the samples' shape (B, ...) (a tuple; for the reference's latents (B, 36, 28, 3)).
    rng: PRNG key for x_T (and for the step noise when eta > 0).
    num_inference_steps: DDIM steps n.
    eta: DDIM stochasticity (0: deterministic given x_T).
    context: optional conditioning, passed through to apply_fn.
    final_alpha_cumprod: alpha-bar before step 0 (see ddim_step).
    x_T: optional starting noise of the given shape (default: drawn from rng).
    spacing: "leading" (the reference's MONAI Generative 0.2.x timesteps) or "linspace"
      (MONAI 1.6's); see ddim_timesteps.

  Returns:
    Samples (float32) of the given shape.
  """
  shape = tuple(shape)
  num_train = schedule.num_steps
  ts = jnp.asarray(ddim_timesteps(num_train, num_inference_steps, spacing=spacing))
  ratio = num_train // num_inference_steps
  init_rng, steps_rng = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(init_rng, shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"ddim_sample: x_T has shape {x_T.shape}, expected {shape}")
  step_rngs = jax.random.split(steps_rng, num_inference_steps)

  def body(x, inputs):
    t, step_rng = inputs
    eps = apply_fn(params, x, jnp.full((shape[0],), t, jnp.int32), context)
    x_prev, _ = ddim_step(schedule, eps.astype(jnp.float32), t, t - ratio, x, eta=eta,
                          rng=step_rng if eta != 0 else None,
                          final_alpha_cumprod=final_alpha_cumprod)
    return x_prev, None

  x0, _ = jax.lax.scan(body, x_T.astype(jnp.float32), (ts, step_rngs))
  return x0


PAD_MODES = ("end", "symmetric")


def _pad_before(extra: int, mode: str) -> int:
  """Rows (columns) padded before the data out of `extra`: 0 at the end, extra // 2
  symmetric (MONAI's SpatialPad: the odd one goes after)."""
  if mode not in PAD_MODES:
    raise ValueError(f"latent padding {mode!r}: expected one of {PAD_MODES}")
  return extra // 2 if mode == "symmetric" else 0


def pad_to_multiple(x: Array, multiple: int = 4, mode: str = "end"
                    ) -> Tuple[Array, Tuple[int, int]]:
  """Zero-pads H and W (axes -3, -2 of (..., H, W, C)) up to a multiple.

  The reference's 34 x 28 latents become 36 x 28 for a UNet with 3 levels; the reference
  pads with MONAI's DivisiblePad(k=4), whose default is symmetric (one row above, one below).

  Args:
    x: (..., H, W, C) array (numpy or JAX).
    multiple: H and W are rounded up to a multiple of this.
    mode: "end" (all padding after the data) or "symmetric" (extra // 2 before, the rest
      after, as MONAI's DivisiblePad / SpatialPad method="symmetric").

  Returns:
    (padded, (H, W)): the padded array and the original spatial size for crop_to.

  Raises:
    ValueError: for multiple < 1, an unknown mode or an input of rank < 3.
  """
  if int(multiple) != multiple or multiple < 1:
    raise ValueError(f"pad_to_multiple: multiple must be a positive integer, got {multiple}")
  if x.ndim < 3:
    raise ValueError(f"pad_to_multiple: expects (..., H, W, C), got shape {x.shape}")
  h, w = x.shape[-3], x.shape[-2]
  pad = [(0, 0)] * x.ndim
  for axis, size in ((-3, h), (-2, w)):
    extra = -size % multiple
    before = _pad_before(extra, mode)
    pad[axis] = (before, extra - before)
  return jnp.pad(x, pad), (h, w)


def crop_to(x: Array, hw: Tuple[int, int], mode: str = "end") -> Array:
  """Crops (..., H, W, C) back to hw = (h, w) (undoes pad_to_multiple with the same mode).

  Args:
    x: (..., H, W, C) array.
    hw: the target (h, w), at most (H, W).
    mode: the padding mode ("end": the first h rows and w columns; "symmetric": the
      centre, as MONAI's DivisiblePad.inverse).

  Returns:
    The cropped array.

  Raises:
    ValueError: if hw exceeds x's spatial size, or for an unknown mode.
  """
  h, w = hw
  if h > x.shape[-3] or w > x.shape[-2]:
    raise ValueError(f"crop_to: cannot crop shape {x.shape} to (h, w) = {tuple(hw)}")
  top = _pad_before(x.shape[-3] - h, mode)
  left = _pad_before(x.shape[-2] - w, mode)
  return x[..., top:top + h, left:left + w, :]
