"""The DeepSSIM model's contract: eval-mode embeddings per image (independent of the
batch), output shape and norm, grey input, freezing mask. Parameter counts (closed form,
torchvision's totals) and speed variants are covered by test_models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from deepssim_jax import models


def test_eval_embedding_of_an_image_does_not_depend_on_its_batch():
  """Eval mode is a per-image function: an image's embedding is the same alone, in any
  batch, at any position and next to padding (the stores pad and shard batches), and it
  uses the running BatchNorm statistics, never the batch's."""
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv",
                            depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 32, 32)), jnp.float32)
  v = model.init(jax.random.key(0), x, train=False)
  rng = np.random.default_rng(2)  # running statistics far from the batch's
  v = {"params": v["params"], "batch_stats": jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), v["batch_stats"])}
  apply = jax.jit(functools.partial(model.apply, train=False))
  whole = np.asarray(apply(v, x))
  for i in range(5):
    np.testing.assert_allclose(apply(v, x[i:i + 1])[0], whole[i], rtol=1e-5, atol=1e-6)
  perm = np.array([3, 0, 4, 1, 2])
  np.testing.assert_allclose(apply(v, x[perm]), whole[perm], rtol=1e-5, atol=1e-6)
  padded = jnp.concatenate([x[:2], jnp.zeros((6, 32, 32), jnp.float32)])
  np.testing.assert_allclose(apply(v, padded)[:2], whole[:2], rtol=1e-5, atol=1e-6)


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
