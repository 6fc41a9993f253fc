"""Depthwise convolution: every form equals direct numpy loops and the grouped convolution
(values and gradients), bad arguments are refused, and "auto" picks its form by backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepssim_jax import depthwise

IMPLS = ("conv", "shift", "dense", "auto")


def numpy_depthwise(x, k):
  """Direct loops: out[b,h,w,c] = sum_ij xpad[b,h+i,w+j,c] k[i,j,c] (SAME, odd kernel)."""
  kh, kw, c = k.shape
  b, h, w, _ = x.shape
  xp = np.zeros((b, h + kh - 1, w + kw - 1, c), np.float64)
  xp[:, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w] = x
  out = np.zeros((b, h, w, c))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i:i + h, j:j + w] * k[i, j]
  return out


@pytest.mark.parametrize("hw", [(9, 7), (3, 2), (12, 10)])
def test_depthwise_impls_match_numpy_and_each_other(hw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *hw, 5)).astype(np.float32)
  k = rng.standard_normal((7, 7, 1, 5)).astype(np.float32)
  want = numpy_depthwise(x.astype(np.float64), k[:, :, 0].astype(np.float64))
  r = rng.standard_normal(want.shape).astype(np.float32)
  grads = {}
  for impl in IMPLS:
    f = jax.jit(functools.partial(depthwise.depthwise_conv, impl=impl))
    np.testing.assert_allclose(f(x, k), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    grads[impl] = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * r), argnums=(0, 1)))(x, k)
  # Gradients of the plain grouped conv come from XLA's own autodiff: the reference.
  for impl in IMPLS[1:]:
    for a, b in zip(grads[impl], grads["conv"]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_depthwise_rejects_bad_impl_and_even_kernel():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="unknown depthwise_impl"):
    depthwise.depthwise_conv(x, jnp.zeros((7, 7, 1, 2)), impl="fft")
  with pytest.raises(ValueError, match="odd"):
    depthwise.depthwise_conv(x, jnp.zeros((4, 4, 1, 2)), impl="shift")


def test_auto_depthwise_form_is_chosen_by_backend(monkeypatch):
  """'auto' is the plain grouped convolution on GPU/TPU and the CPU forms on CPU."""
  assert depthwise.auto_impl(238, "gpu") == depthwise.auto_impl(12, "tpu") == "conv"
  assert depthwise.auto_impl(238, "cpu") == "shift"
  assert depthwise.auto_impl(depthwise.AUTO_DENSE_MAX_POSITIONS, "cpu") == "dense"
  x = jnp.zeros((1, 16, 16, 4))
  k = jnp.zeros((7, 7, 1, 4))

  def grouped_convs(backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jaxpr = jax.make_jaxpr(lambda a, b: depthwise.depthwise_conv(a, b, "auto"))(x, k)
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"
            and e.params["feature_group_count"] == 4]

  assert len(grouped_convs("gpu")) == 1
  assert not grouped_convs("cpu")
