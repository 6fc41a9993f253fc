"""DeepSSIM embedder: parameter counts, depthwise forms in the model, freezing, train modes."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from deepssim_jax import models

IMPLS = ("conv", "shift", "dense", "auto")


# ----------------------------------------------------------------------------- helpers

def closed_form_features(depths, dims, in_ch=3):
  """Parameters of torchvision's convnext `features` (no final norm), counted by hand."""
  n = dims[0] * in_ch * 16 + dims[0] + 2 * dims[0]  # stem conv 4x4 + bias + LayerNorm
  for i, (depth, d) in enumerate(zip(depths, dims)):
    if i:
      n += 2 * dims[i - 1] + dims[i - 1] * d * 4 + d  # LayerNorm + conv 2x2 + bias
    # dwconv 7x7 + bias, LayerNorm, Linear d->4d, Linear 4d->d, layer scale
    n += depth * (49 * d + d + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + d)
  return n


def torchvision_total(depths, dims, classes=1000):
  """torchvision convnext_*: features + classifier (LayerNorm2d + Linear)."""
  return closed_form_features(depths, dims) + 2 * dims[-1] + dims[-1] * classes + classes


def shapes(name, image=(136, 112), **overrides):
  model = models.make_model(name, **overrides)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros((1, *image), jnp.float32))


def tiny(**kw):
  kw.setdefault("hidden_dim", 32)
  kw.setdefault("embed_dim", 16)
  return models.make_model("convnext_atto", **kw)


# ----------------------------------------------------------------------------- counts

@pytest.mark.parametrize("name,published_total", [
    ("convnext_tiny", 28_589_128),   # torchvision docs: convnext_tiny num_params
    ("convnext_small", 50_223_688),
    ("convnext_base", 88_591_464),
])
def test_backbone_param_counts_match_torchvision(name, published_total):
  depths, dims = models.MODELS[name].keywords["depths"], models.MODELS[name].keywords["dims"]
  # The closed form is independent of the Flax code; it reproduces torchvision's totals.
  assert torchvision_total(depths, dims) == published_total
  v = shapes(name)
  assert models.param_count(v["params"]["backbone"]) == closed_form_features(depths, dims)
  if name == "convnext_base":
    assert models.param_count(v["params"]["backbone"]) == 87_564_416


def test_small_and_tiny_counts_quoted_with_final_norm():
  # 27,820,128 / 49,454,688 (quoted in the brief) are features + the classifier's LayerNorm.
  for name, quoted in [("convnext_tiny", 27_820_128), ("convnext_small", 49_454_688)]:
    depths, dims = models.MODELS[name].keywords["depths"], models.MODELS[name].keywords["dims"]
    assert closed_form_features(depths, dims) + 2 * dims[-1] == quoted


def test_head_counts_and_batch_stats():
  v = shapes("convnext_base")
  head = models.param_count(v["params"]["head"])
  bn, hidden, embed = 2 * 1024, 1024 * 512 + 512, 512 * 256 + 256
  assert head == bn + hidden + embed == 658_176
  assert models.param_count(v["params"]) == 87_564_416 + 658_176
  assert jax.tree.map(lambda s: s.shape, v["batch_stats"]) == {
      "head": {"bn": {"mean": (1024,), "var": (1024,)}}}


def test_param_tree_identical_across_impls():
  trees = [jax.tree.map(lambda s: (s.shape, s.dtype), shapes("convnext_atto", (40, 36),
                                                             depthwise_impl=i))
           for i in IMPLS]
  for t in trees[1:]:
    assert t == trees[0]


# ----------------------------------------------------------------------------- layers

def test_model_outputs_and_grads_equal_across_impls():
  # 40x36 input: stage maps 10x9 (shift under "auto"), 5x4, 2x2, 1x1 (dense under "auto").
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40, 36)), jnp.float32)
  base = tiny(depthwise_impl="conv")
  v = jax.jit(functools.partial(base.init, train=False))(jax.random.key(0), x)
  # Make the depthwise taps matter: layer scale 1e-6 would hide any difference.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.ones_like(a) if "layer_scale" in jax.tree_util.keystr(p) else a,
      v["params"])
  target = jnp.array([0.2, 0.5, 0.9])

  def loss(model, p):
    emb = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=False)
    return jnp.mean((models.cosine(emb, emb[::-1]) - target) ** 2), emb

  ref = None
  for impl in IMPLS:
    (l, emb), g = jax.jit(jax.value_and_grad(functools.partial(loss, tiny(depthwise_impl=impl)),
                                             has_aux=True))(params)
    if ref is None:
      ref = (l, emb, g)
      continue
    np.testing.assert_allclose(emb, ref[1], rtol=1e-4, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(l, ref[0], rtol=1e-4, err_msg=impl)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=1e-6,
                                   err_msg=impl), g, ref[2])


def test_patch_conv_equals_strided_conv():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 3)), jnp.float32)  # odd sizes: VALID crops
  pc = models.PatchConv(4, 2)
  v = pc.init(jax.random.key(0), x)
  want = nn.Conv(4, (2, 2), strides=(2, 2), padding="VALID").apply(v, x)
  np.testing.assert_allclose(pc.apply(v, x), want, rtol=1e-5, atol=1e-6)


def test_gelu_is_exact_erf_gelu():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  want = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x.astype(np.float64)])
  np.testing.assert_allclose(models.gelu(jnp.asarray(x)), want, atol=3e-7)
  assert np.abs(np.asarray(models.gelu(jnp.asarray(x), approximate=True)) - want).max() > 1e-5


# ----------------------------------------------------------------------------- model

def test_embeddings_shape_unit_norm_and_grey_repeat():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32)), jnp.float32)
  model = models.make_model("convnext_atto")  # default head: 512 hidden, 256-d embedding
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  emb = model.apply(v, x, train=False)
  assert emb.shape == (4, 256)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(model.apply(v, x[..., None], train=False), emb, rtol=1e-6)
  # By hand: backbone on the grey image repeated to RGB, mean pool, head, L2 norm.
  feats = models.ConvNeXtAtto(depthwise_impl="auto").apply(
      {"params": v["params"]["backbone"]}, jnp.repeat(x[..., None], 3, -1))
  h = models.Head().apply({"params": v["params"]["head"], "batch_stats": v["batch_stats"]["head"]},
                          feats.mean(axis=(1, 2)), False)
  np.testing.assert_allclose(emb, h / jnp.linalg.norm(h, axis=-1, keepdims=True), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="grey images"):
    model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False)


def test_cosine_matches_numpy():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
  want = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  np.testing.assert_allclose(models.cosine(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-5)


def test_batchnorm_stats_update_only_in_train_and_dropout_only_in_train():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 32, 32)), jnp.float32)
  model = tiny(depthwise_impl="conv")
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  stats0 = v["batch_stats"]
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  out_eval, upd = apply(v, x, train=False, mutable=("batch_stats",))
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], stats0)
  np.testing.assert_array_equal(out_eval, apply(v, x, train=False, mutable=False))
  # Train mode: statistics move toward the batch's and dropout depends on the rng.
  out1, upd1 = apply(v, x, train=True, mutable=("batch_stats",),
                     rngs={"dropout": jax.random.key(1)})
  out2, _ = apply(v, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(upd1["batch_stats"]["head"]["bn"]["mean"], stats0["head"]["bn"]["mean"])
  assert not np.allclose(out1, out2)
  # Without dropout (and drop-path), train mode is rng-independent: BN alone changes nothing.
  nodrop = tiny(depthwise_impl="conv", dropout=0.0)
  o1, _ = nodrop.apply(v, x, train=True, mutable=("batch_stats",),
                         rngs={"dropout": jax.random.key(1)})
  o2, _ = nodrop.apply(v, x, train=True, mutable=("batch_stats",),
                         rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(o1, o2)


def test_drop_path_drops_whole_samples_at_its_rate():
  x = jnp.ones((4000, 2, 2, 3))
  y = models.DropPath(0.25).apply({}, x, True, rngs={"dropout": jax.random.key(0)})
  per_sample = np.asarray(y).reshape(4000, -1)
  kept = per_sample[:, 0] > 0
  assert np.all(per_sample[kept] == pytest.approx(1 / 0.75))
  assert np.all(per_sample[~kept] == 0)
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_array_equal(models.DropPath(0.25).apply({}, x, False), x)


def test_make_model_rejects_unknown_name():
  with pytest.raises(ValueError, match="unknown model"):
    models.make_model("resnet50")


# ----------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_freeze_mask_freezes_stem_and_first_stages(n):
  params = shapes("convnext_atto", (32, 32))["params"]
  flat = traverse_util.flatten_dict(models.freeze_mask(params, n))
  for path, trainable in flat.items():
    if path[0] == "head":
      assert trainable, path
      continue
    part = path[1]
    stage = -1 if part == "stem" else int(part.split("_")[1])
    assert trainable == (n == 0 or stage >= n), path
  # Downsampling in front of stage i goes with stage i.
  if n == 2:
    assert flat[("backbone", "stages_1", "downsample", "conv", "kernel")] is False
    assert flat[("backbone", "stages_2", "downsample", "conv", "kernel")] is True
  labels = traverse_util.flatten_dict(models.trainable_labels(params, n))
  assert {p: (l == "train") for p, l in labels.items()} == flat
  with pytest.raises(ValueError, match="num_frozen_stages"):
    models.freeze_mask(params, 5)


def test_frozen_params_stay_fixed_under_multi_transform():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 32, 32)), jnp.float32)
  model = tiny(depthwise_impl="conv")
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  params = v["params"]
  tx = optax.multi_transform({"train": optax.adamw(1e-2, weight_decay=1e-2),
                              "frozen": optax.set_to_zero()},
                             models.trainable_labels(params, 2))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  mask = traverse_util.flatten_dict(models.freeze_mask(params, 2))
  flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
  for path, trainable in mask.items():
    changed = not np.array_equal(flat_old[path], flat_new[path])
    assert changed == trainable, path


def test_grid_pool_equals_torch_adaptive_avg_pool_and_the_grid_head_keeps_layout():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(4).standard_normal((2, 5, 7, 3)).astype(np.float32)
  for grid in ((2, 2), (3, 2), (5, 7), (1, 1)):
    want = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), grid).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(models.grid_pool(jnp.asarray(x), grid), want, atol=1e-6)
  with pytest.raises(ValueError, match="finer"):
    models.grid_pool(jnp.asarray(x), (6, 2))
  # The grid head: one hidden input per (cell, channel) of the last stage, unit embeddings.
  img = jnp.asarray(np.random.default_rng(5).standard_normal((1, 64, 64)), jnp.float32)
  pair = jnp.concatenate([img, img[:, ::-1]])
  model = models.make_model("convnext_atto", head="grid", grid=(2, 2), depths=(1, 1, 1, 1),
                            dims=(8, 16, 32, 64), hidden_dim=32, embed_dim=16)
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), pair)
  emb = model.apply(v, pair, train=False)
  assert emb.shape == (2, 16)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  assert v["params"]["head"]["hidden"]["kernel"].shape[0] == 2 * 2 * 64
  feats = model.backbone.apply({"params": v["params"]["backbone"]},
                               jnp.repeat(pair[..., None], 3, -1))
  h = models.Head(16, 32).apply({"params": v["params"]["head"],
                                 "batch_stats": v["batch_stats"]["head"]},
                                models.grid_pool(feats, (2, 2)).reshape(2, -1), False)
  np.testing.assert_allclose(emb, h / jnp.linalg.norm(h, axis=-1, keepdims=True), rtol=1e-5,
                             atol=1e-6)
