"""The DeepSSIM model's contract: parameter counts (closed form, via eval_shape), output
shape and norm, grey input, freezing mask. Speed variants are covered by test_models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from deepssim_jax import models


def convnext_features_params(depths, dims, in_ch=3):
  """torchvision convnext_*.features parameter count, written from the architecture."""
  n = in_ch * dims[0] * 16 + dims[0] + 2 * dims[0]  # stem conv 4x4 + LayerNorm
  for i, (d, c) in enumerate(zip(depths, dims)):
    if i:
      n += 2 * dims[i - 1] + dims[i - 1] * c * 4 + c  # LayerNorm + conv 2x2 stride 2
    block = (49 * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + c
    n += d * block  # dwconv 7x7, LayerNorm, Dense 4x, Dense back, layer scale
  return n


@pytest.mark.parametrize("name,expected", [("convnext_tiny", 27_818_592),
                                           ("convnext_small", 49_453_152),
                                           ("convnext_base", 87_564_416)])
def test_backbone_parameter_counts(name, expected):
  # Base: the reference's measured backbone (BENCH.md, 87.56M). torchvision's tiny/small
  # totals are 1,536 higher only because they count the classifier's LayerNorm(768).
  backbone = models.MODELS[name]()
  shapes = jax.eval_shape(functools.partial(backbone.init), jax.random.key(0),
                          jnp.zeros((1, 136, 112, 3)))
  n = models.param_count(shapes["params"])
  assert n == expected
  assert n == convnext_features_params(backbone.depths, backbone.dims)


def test_deepssim_head_and_total_count():
  model = models.make_model("convnext_base")
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 136, 112)))
  head = 2 * 1024 + (1024 * 512 + 512) + (512 * 256 + 256)  # BatchNorm + Dense + Dense
  assert models.param_count(shapes["params"]) == 87_564_416 + head
  stats = models.param_count(shapes["batch_stats"])
  assert stats == 2 * 1024


def test_output_is_unit_norm_and_grey_input_equals_repeated_rgb():
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  e = model.apply(variables, x, train=False)
  assert e.shape == (3, 8)
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  e4 = model.apply(variables, x[..., None], train=False)  # (B, H, W, 1) also accepted
  np.testing.assert_allclose(e, e4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, 2, 4])
def test_freeze_mask_freezes_stem_and_first_stages_only(n):
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv")
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32)))
  mask = traverse_util.flatten_dict(models.freeze_mask(shapes["params"], n))
  frozen = {p[1] for p, t in mask.items() if not t}
  expected = set() if n == 0 else {"stem"} | {f"stages_{i}" for i in range(n)}
  assert frozen == expected
  assert all(t for p, t in mask.items() if p[0] != "backbone")  # the head always trains
