"""Training: loss goes down, frozen stages stay, 4 devices == 1, checkpoints, kill-and-resume."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from deepssim_jax import (augment, config_lib, fileio, parallel, pipeline, runs, train,
                          validate)

SIZE = (32, 32)


def tiny_config(**train_overrides):
  c = config_lib.base_config()
  c.data.image_size = SIZE
  c.model.name = "convnext_atto"
  c.model.num_frozen_stages = 0  # freezing needs model.init_from (test_init_from_...)
  # The grouped-conv depthwise form compiles ~5x faster than the default shift-sum form;
  # test_models checks that both give the same numbers.
  c.model.overrides.update(dict(hidden_dim=32, embed_dim=16, depthwise_impl="conv"))
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_epochs = 2
  c.train.log_every_steps = 2
  c.train.update(train_overrides)
  return c


def smooth_images(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, SIZE[0] // 4, SIZE[1] // 4))
  x = np.kron(x, np.ones((4, 4)))  # blocky, so there is structure to learn
  x += 0.3 * rng.normal(size=x.shape)
  return ((x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("banks"))
  real = pipeline.save_bank_arrays(folder, "real", {"images": smooth_images(12, 0)})
  synth = pipeline.save_bank_arrays(folder, "synth", {"images": smooth_images(12, 1)})
  rng = np.random.default_rng(0)
  ia, ib = rng.integers(0, 12, 40), rng.integers(0, 12, 40)
  s = rng.uniform(0, 1, 40).astype(np.float32)
  return (pipeline.PairSource(real, synth, ia[:32], ib[:32], s[:32]),
          pipeline.PairSource(real, synth, ia[32:], ib[32:], s[32:]))


def fixed_batch(source, n=8):
  items = [source[i] for i in range(n)]
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


def _step_fn(config, total_steps=100):
  aug = augment.AugmentConfig.from_config(config.aug)
  return jax.jit(lambda s, b, r: train.train_step(
      s, b, r, aug=aug, optim=config.optim, total_steps=total_steps,
      num_frozen_stages=config.model.num_frozen_stages, freeze=config.model.freeze,
      branches=config.train.branches, band=tuple(config.train.band),
      band_weight=config.train.band_weight, over_weight=config.train.over_weight))


def test_jitted_step_lowers_loss_and_keeps_frozen_params(sources):
  config = tiny_config()
  config.model.num_frozen_stages = 2
  config.aug.update(dict(p_flip0=0.0, p_flip1=0.0, p_rotate=0.0, p_gamma=0.0))
  config.model.overrides.dropout = 0.0
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  step = _step_fn(config)
  batch = fixed_batch(sources[0])
  losses = []
  new = state
  for _ in range(15):
    new, m = step(new, batch, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(new.step) == 15
  flat0 = traverse_util.flatten_dict(state.params)
  flat1 = traverse_util.flatten_dict(new.params)
  frozen = [p for p in flat0 if p[1] in ("stem", "stages_0", "stages_1")]
  trained = [p for p in flat0 if p[0] == "head"]
  assert frozen and trained
  for p in frozen:
    np.testing.assert_array_equal(flat0[p], flat1[p], err_msg=str(p))
  assert all(not np.allclose(flat0[p], flat1[p]) for p in trained)
  assert any(not np.allclose(flat0[p], flat1[p]) for p in flat0 if p[1] == "stages_3")


def test_four_devices_equal_one(sources):
  # Adam divides by sqrt(v) + eps: with eps 1e-8 it turns the ~1e-9 gradients behind
  # ConvNeXt's 1e-6 layer scales into full-size steps, magnifying reduction-order noise
  # (not a data-parallel effect). A larger eps keeps the comparison well-conditioned.
  config = tiny_config()
  config.optim.eps = 1e-3
  batch = fixed_batch(sources[0])
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = parallel.make_mesh(devices)
    state = parallel.replicate(train.create_train_state(config, jax.random.key(0), SIZE, 100),
                               mesh)
    step = _step_fn(config)
    losses = []
    for i in range(3):
      state, m = step(state, parallel.shard_batch(batch, mesh), jax.random.key(7))
      losses.append(float(m["loss"]))
    results.append((losses, jax.device_get(state.params), jax.device_get(state.batch_stats)))
  (l1, p1, b1), (l4, p4, b4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves((p1, b1)), jax.tree.leaves((p4, b4))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_and_outputs(tmp_path, sources):
  config = tiny_config()
  out = train.train_and_evaluate(config, str(tmp_path), *sources)
  assert out["step"] == 8  # 32 pairs / 8 per batch * 2 epochs
  for which in ("latest", "best"):
    _, variables, step = train.restore_model(str(tmp_path), which)
    if which == "latest":
      assert step == 8
      for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(out["params"])):
        np.testing.assert_array_equal(a, b)
  assert os.path.exists(tmp_path / "config.json")
  assert runs.load_config(str(tmp_path)).model.name == "convnext_atto"
  table = fileio.read_csv(tmp_path / "metrics.csv",
                          required=["step", "loss", "val_loss", "val_mae"])
  assert [int(s) for s in table["step"]] == [2, 4, 6, 8]
  assert os.listdir(tmp_path / "tensorboard")
  # The best checkpoint is the epoch with the lowest validation loss.
  val = {int(s): float(v) for s, v in zip(table["step"], table["val_loss"]) if v}
  _, _, best_step = train.restore_model(str(tmp_path), "best")
  assert best_step == min(val, key=val.get)
  with pytest.raises(fileio.InputError, match="no checkpoint at step 3"):
    train.restore_model(str(tmp_path), "latest", step=3)


def test_kill_and_resume_equals_uninterrupted(tmp_path, sources):
  config = tiny_config(checkpoint_every_steps=2)
  full = train.train_and_evaluate(config, str(tmp_path / "a"), *sources)
  # "Killed" after 5 steps: the latest checkpoint is step 4; step 5 is lost and redone.
  part = train.train_and_evaluate(config, str(tmp_path / "b"), *sources, stop_after=5)
  assert part["step"] == 5
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"), *sources)
  assert resumed["step"] == full["step"] == 8
  for a, b in zip(jax.tree.leaves((full["params"], full["batch_stats"])),
                  jax.tree.leaves((resumed["params"], resumed["batch_stats"]))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
  rows = fileio.read_csv(tmp_path / "b" / "metrics.csv")["step"]
  assert [int(s) for s in rows] == [2, 4, 6, 8]  # no duplicated or lost rows


def test_resume_refuses_other_data(tmp_path, sources):
  config = tiny_config(checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path), *sources, stop_after=2)
  tr, va = sources
  other = pipeline.PairSource(tr.real_path, tr.synth_path, tr.real_idx, tr.synth_idx,
                              tr.ssim[::-1].copy())
  with pytest.raises(fileio.InputError, match="other data"):
    train.train_and_evaluate(config, str(tmp_path), other, va)


# ----------------------------------------------------------------------------- reference semantics


def _backbone_file(tmp_path, seed=5):
  """A random convnext_atto backbone saved as a torchvision-layout .safetensors file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from deepssim_jax import convnext_keys  # pylint: disable=g-import-not-at-top
  model = train.model_from_config(tiny_config())
  params = model.init(jax.random.key(seed), np.zeros((1, *SIZE), np.float32))["params"]
  path = str(tmp_path / "backbone.safetensors")
  save_file(convnext_keys.to_torchvision(params["backbone"]), path)
  return path, params["backbone"]


def test_frozen_random_layers_are_refused_and_nothing_is_written(tmp_path, sources):
  config = tiny_config()
  config.model.num_frozen_stages = 2
  with pytest.raises(fileio.InputError, match="model.init_from"):
    train.train_and_evaluate(config, str(tmp_path / "run"), *sources)
  config.model.num_frozen_stages, config.model.freeze = 0, "reference"
  with pytest.raises(fileio.InputError, match="model.init_from"):
    train.train_and_evaluate(config, str(tmp_path / "run"), *sources)
  assert not os.path.exists(tmp_path / "run")


def test_init_from_loads_the_backbone_and_frozen_stages_keep_it(tmp_path, sources):
  path, want = _backbone_file(tmp_path)
  config = tiny_config(num_epochs=1)
  config.model.num_frozen_stages = 2
  config.model.init_from = path
  out = train.train_and_evaluate(config, str(tmp_path / "run"), *sources)
  got = traverse_util.flatten_dict(out["params"]["backbone"])
  want = traverse_util.flatten_dict(want)
  for p in want:
    if p[0] in ("stem", "stages_0", "stages_1"):  # frozen: exactly the file's weights
      np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  assert any(not np.allclose(got[p], want[p]) for p in want if p[0] == "stages_3")
  # A different file on the same workdir is other settings: refused, not silently resumed.
  other, _ = _backbone_file(tmp_path / "..", seed=6)
  config.model.init_from = other
  with pytest.raises(fileio.InputError, match="other data/settings"):
    train.train_and_evaluate(config, str(tmp_path / "run"), *sources)


def test_reference_freeze_rule_trains_only_names_without_0_or_1(sources):
  from deepssim_jax import convnext_keys  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.model.freeze = "reference"
  config.model.overrides.dropout = 0.0
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  new, _ = _step_fn(config)(state, fixed_batch(sources[0]), jax.random.key(1))
  before = traverse_util.flatten_dict(state.params["backbone"])
  after = traverse_util.flatten_dict(new.params["backbone"])
  for p in before:
    name = convnext_keys.torchvision_name(p)
    changed = not np.array_equal(before[p], after[p])
    assert changed == ("0" not in name and "1" not in name), (p, name)


def test_layer_decay_scales_each_stage_first_step():
  """Adam's first step moves every weight by lr (sign of its gradient): with layer decay d,
  a leaf of backbone stage i of 4 moves by lr * d**(4 - i) (plus its weight decay)."""
  config = tiny_config()
  config.optim.layer_decay = 0.3
  config.optim.weight_decay = 0.0
  config.optim.eps = 1e-30  # behind 1e-6 layer scales gradients are tiny; eps must not matter
  config.model.overrides.dropout = 0.0
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  scales = traverse_util.flatten_dict(train.lr_scales(state.params, 0.3))
  assert scales[("backbone", "stages_3", "block_0", "pwconv1", "kernel")] == pytest.approx(0.3)
  assert scales[("backbone", "stem", "conv", "kernel")] == pytest.approx(0.3 ** 4)
  assert scales[("head", "hidden", "kernel")] == 1.0
  rng = np.random.default_rng(0)
  batch = {"image_a": rng.normal(size=(8, *SIZE)).astype(np.float32),
           "image_b": rng.normal(size=(8, *SIZE)).astype(np.float32),
           "ssim": rng.uniform(size=8).astype(np.float32), "weight": np.ones(8, np.float32)}
  new, _ = _step_fn(config)(state, batch, jax.random.key(1))
  before, after = (traverse_util.flatten_dict(t) for t in (state.params, new.params))
  lr = config.optim.learning_rate
  for p in (("backbone", "stages_3", "block_0", "layer_scale"),
            ("backbone", "stages_1", "block_0", "layer_scale"),
            ("backbone", "stages_2", "block_0", "pwconv1", "kernel"), ("head", "embed", "kernel")):
    step = np.abs(np.asarray(after[p]) - np.asarray(before[p]))
    assert np.median(step[step > 0]) == pytest.approx(lr * scales[p], rel=1e-3), p


def test_augmented_validation_is_augmented_and_repeatable(sources):
  config = tiny_config()
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  aug = augment.AugmentConfig.from_config(config.aug)
  batch = fixed_batch(sources[1])
  plain = train.eval_step(state, batch)
  a1 = train.eval_step(state, batch, jax.random.key(3), aug)
  a2 = train.eval_step(state, batch, jax.random.key(3), aug)
  assert float(a1["sse"]) == float(a2["sse"])
  assert float(a1["sse"]) != pytest.approx(float(plain["sse"]), rel=1e-6)


def test_separate_branches_update_batchnorm_twice(sources):
  """train.branches='separate' (the reference): each branch's BatchNorm statistics are its
  own and the running averages take two updates per step."""
  config = tiny_config()
  config.aug.update(dict(p_flip0=0.0, p_flip1=0.0, p_rotate=0.0, p_gamma=0.0))
  config.model.overrides.dropout = 0.0
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  batch = fixed_batch(sources[0])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  ea, upd = state.apply_fn(variables, batch["image_a"], train=True, mutable=["batch_stats"])
  eb, upd = state.apply_fn({"params": state.params, **upd}, batch["image_b"], train=True,
                           mutable=["batch_stats"])
  want_loss = float(np.mean((np.sum(ea * eb, -1) - batch["ssim"]) ** 2))
  config.train.branches = "separate"
  new, m = _step_fn(config)(state, batch, jax.random.key(1))
  assert float(m["loss"]) == pytest.approx(want_loss, rel=1e-5)
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(upd["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  config.train.branches = "joint"
  joint, mj = _step_fn(config)(state, batch, jax.random.key(1))
  assert float(mj["loss"]) != pytest.approx(want_loss, rel=1e-4)


def test_gem_head_bf16_step_keeps_float32_params(sources):
  config = tiny_config()
  config.model.head = "gem"
  config.model.overrides.update(dict(hidden_dim=0, dtype="bfloat16"))
  config.optim.layer_decay = 0.3
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  assert state.params["head"]["hidden"]["kernel"].shape == (8 + 16 + 32 + 64, (120 + 16) // 2)
  new, m = _step_fn(config)(state, fixed_batch(sources[0]), jax.random.key(1))
  assert np.isfinite(float(m["loss"]))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(new.params))
  assert float(new.params["head"]["gem_0"][0]) != 3.0  # the GeM exponents learn


@pytest.mark.parametrize("field", ["p_contrast", "p_shape", "p_blur", "p_elastic",
                                   "p_neighbour", "p_noise"])
def test_randomized_pairs_train_on_the_recomputed_target(sources, field):
  # A pair of one image with itself stored with a wrong target 0: contrast, shape, blur or
  # anatomy randomization at p 1 maps both images alike, so the step's target is their SSIM, 1,
  # which the cosine of identical inputs meets (loss ~0); without it the loss is (1 - 0)^2.
  # Synthetic neighbours with a warp bound of 0 pair the image with itself, target 1, and
  # noise of sigma 0 leaves it alone.
  config = tiny_config()
  config.aug.update(dict(p_flip0=0.0, p_flip1=0.0, p_rotate=0.0, p_gamma=0.0))
  config.model.overrides.update(dict(dropout=0.0, drop_path_rate=0.0))
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  batch = fixed_batch(sources[0])
  batch = dict(batch, image_b=batch["image_a"], ssim=np.zeros_like(batch["ssim"]))
  _, plain = _step_fn(config)(state, batch, jax.random.key(1))
  config.aug[field] = 1.0
  config.aug.update(dict(neighbour_min_disp=0.0, neighbour_max_disp=0.0,
                         noise_min_sigma=0.0, noise_max_sigma=0.0))
  _, randomized = _step_fn(config)(state, batch, jax.random.key(1))
  assert float(plain["loss"]) == pytest.approx(1.0, abs=1e-4)
  assert float(randomized["loss"]) < 1e-4


# Pairs of an image with itself (cosine 1), four of each target, closed forms:
# band_weight: targets 0.7 (in the band (0.5, 0.95): error 0.3) and 0.2 (outside: 0.8), the
# loss (4 w 0.09 + 4 0.64) / (4 w + 4); over_weight: targets 0.7 (scored above: 0.3) and
# 1.2 (below: -0.2), the loss (4 w 0.09 + 4 0.04) / (4 w + 4). The MAE is unweighted.
@pytest.mark.parametrize("weight", [1.0, 3.0])
@pytest.mark.parametrize("field,targets,other,mae", [("band_weight", (0.7, 0.2), 0.64, 0.55),
                                                     ("over_weight", (0.7, 1.2), 0.04, 0.25)])
def test_loss_weights_weigh_their_pairs(sources, field, targets, other, mae, weight):
  config = tiny_config()
  config.aug.update(dict(p_flip0=0.0, p_flip1=0.0, p_rotate=0.0, p_gamma=0.0))
  config.model.overrides.update(dict(dropout=0.0, drop_path_rate=0.0))
  config.train.band = (0.5, 0.95)
  config.train[field] = weight
  validate.check_deepssim(config, "train")
  state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
  batch = fixed_batch(sources[0])
  target = np.array(list(targets) * 4, batch["ssim"].dtype)
  batch = dict(batch, image_b=batch["image_a"], ssim=target)
  _, m = _step_fn(config)(state, batch, jax.random.key(1))
  want = (4 * weight * 0.09 + 4 * other) / (4 * weight + 4)
  assert float(m["loss"]) == pytest.approx(want, abs=1e-4)
  assert float(m["mae"]) == pytest.approx(mae, abs=1e-4)


def test_band_settings_are_validated():
  config = tiny_config()
  for key, value, what in (("band_weight", 0.0, "band_weight must be > 0"),
                           ("over_weight", -1.0, "over_weight must be > 0"),
                           ("band", (0.9, 0.5), r"band must be \(t_low, t_high\)")):
    bad = config.copy_and_resolve_references()
    bad.train[key] = value
    with pytest.raises(validate.ConfigError, match=what):
      validate.check_deepssim(bad, "train")
