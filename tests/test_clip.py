"""SemDeDup's CLIP image tower (deepssim_jax.clip) against open_clip, and its input against
open_clip's transform (torchvision + PIL) on real vendored slices."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from deepssim_jax import clip, fileio
from deepssim_jax.data import demo

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
PIL_Image = pytest.importorskip("PIL.Image")

TINY = dict(width=64, layers=2, heads=4, patch_size=8, image_size=32, embed_dim=32)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
  """pretrained=None must never fetch anything: every open_clip download path raises."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"open_clip tried to download: {args} {kwargs}")
  for mod in (open_clip.pretrained, open_clip.factory):
    for name in ("download_pretrained", "download_pretrained_from_hf",
                 "download_pretrained_from_url"):
      if hasattr(mod, name):
        monkeypatch.setattr(mod, name, refuse)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_clip(act: str, seed: int = 0):
  """A whole open_clip CLIP (image and text towers), random weights, every visual parameter
  perturbed (LayerNorm and attention biases start at 1 / 0)."""
  torch.manual_seed(seed)
  net = open_clip.model.CLIP(
      embed_dim=TINY["embed_dim"], quick_gelu=act == "quick_gelu",
      vision_cfg=dict(image_size=TINY["image_size"], patch_size=TINY["patch_size"],
                      width=TINY["width"], layers=TINY["layers"], head_width=16),
      text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
  with torch.no_grad():
    for p in net.visual.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return net.eval()


def _u8(x):  # a z-scored slice as the reference's 8-bit PNG (tests/test_fsim.py)
  x = np.asarray(x, np.float64)
  return np.round((x - x.min()) / (x.max() - x.min()) * 255.0).astype(np.uint8)


def _reference_input(slices, size):
  """open_clip's eval transform on each slice's PNG as the reference reads it (RGB PIL)."""
  tf = open_clip.transform.image_transform(size, is_train=False, mean=clip.OPENAI_MEAN,
                                           std=clip.OPENAI_STD)
  return np.stack([tf(PIL_Image.fromarray(_u8(s)).convert("RGB")).numpy() for s in slices])


def _slices(size=(136, 112)):
  return demo.demo_sets(size=size, slices_per_head=1, num_copies=1, num_neighbours=1,
                        num_other=1, heldout_per_head=0)["training"]["images"]


def _state(net):
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("act,fmt", [("gelu", ".bin"), ("quick_gelu", ".safetensors")])
def test_tiny_tower_matches_open_clip(tmp_path, act, fmt):
  net = _tiny_clip(act)
  path = str(tmp_path / f"open_clip_model{fmt}")
  if fmt == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in _state(net).items()}, path)
  else:
    torch.save(net.state_dict(), path)
  model = clip.CLIPVision(**TINY, act=act)
  variables = clip.load(path, model)
  # The network alone, on one input: open_clip's encode_image (not normalised).
  x = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = net.encode_image(torch.from_numpy(x)).numpy()
  got = np.asarray(model.clone(normalize=False).apply(variables, x.transpose(0, 2, 3, 1)))
  err = np.abs(got - want).max()
  rel = err / np.abs(want).max()
  print(f"tiny {act}: max abs {err:.3g}, relative {rel:.3g}")  # measured 1.3e-6, 5.5e-7 (gelu)
  assert got.shape == want.shape and rel <= 1e-5
  # End to end from z-scored slices: each side's own preprocessing, normalised embeddings.
  slices = _slices()
  with torch.no_grad():
    want = net.encode_image(torch.from_numpy(_reference_input(slices, 32)),
                            normalize=True).numpy()
  got = np.asarray(clip.embeddings(variables, model, jnp.asarray(slices)))
  print(f"tiny {act} from slices: max abs {np.abs(got - want).max():.3g}")
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  # The default module returns the same unit vectors (the registry's contract).
  np.testing.assert_allclose(model.apply(variables, clip.preprocess(slices, 32)), got,
                             atol=1e-6)


def test_bare_tower_and_ddp_prefix_are_accepted():
  net = _tiny_clip("gelu")
  model = clip.CLIPVision(**TINY)
  whole = clip.load_state_dict(model, _state(net))
  bare = clip.load_state_dict(model, {k: v.numpy() for k, v in net.visual.state_dict().items()})
  ddp = clip.load_state_dict(model, {"module." + k: v for k, v in _state(net).items()})
  for other in (bare, ddp):
    jax.tree.map(np.testing.assert_array_equal, whole, other)
  assert clip.infer_config(_state(net)) == {**TINY, "heads": 1}  # heads: width // 64


def test_bad_state_dict_names_the_key():
  state = _state(_tiny_clip("gelu"))
  model = clip.CLIPVision(**TINY)
  broken = dict(state)
  del broken["visual.transformer.resblocks.1.ln_2.bias"]
  with pytest.raises(fileio.InputError, match="missing.*resblocks_1/ln_2/bias"):
    clip.load_state_dict(model, broken)
  broken = dict(state, **{"visual.transformer.resblocks.0.ls_1.gamma": np.ones(64)})
  with pytest.raises(fileio.InputError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
    clip.load_state_dict(model, broken)
  broken = dict(state, **{"visual.proj": np.ones(64, np.float32)})
  with pytest.raises(fileio.InputError, match=r"wrong rank.*visual\.proj \(shape \(64,\)\)"):
    clip.load_state_dict(model, broken)
  with pytest.raises(fileio.InputError, match=r"proj: file \(64, 32\) vs model \(64, 16\).*"
                                              r"'embed_dim': 32"):
    clip.load_state_dict(clip.CLIPVision(**{**TINY, "embed_dim": 16}), state)
  bare = {k: v.numpy() for k, v in _tiny_clip("gelu").visual.state_dict().items()}
  with pytest.raises(fileio.InputError, match=r"\['attn_pool\.query'\]"):  # its own name
    clip.load_state_dict(model, dict(bare, **{"attn_pool.query": np.ones((2, 64))}))
  with pytest.raises(fileio.InputError, match="no such file"):
    clip.load("/nonexistent/open_clip_model.safetensors", model)


def test_converter_fits_the_full_size_model_layout():
  """open_clip's ViT-B-32 (pretrained=None: no download, checked by the fixture) built on
  torch's meta device: its keys and shapes, converted, are exactly our variables' shapes
  (jax.eval_shape: nothing of ours is initialised)."""
  net = open_clip.create_model(clip.DEFAULT_MODEL, pretrained=None, device="meta")
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape))  # shapes only, no memory
           for k, v in net.state_dict().items()}
  mapped, unknown = clip.map_keys(state)
  assert not unknown
  model = clip.make(clip.DEFAULT_MODEL)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 224, 224, 3))))
  want = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(target).items()}
  assert {p: a.shape for p, a in mapped.items()} == want
  assert len(want) == len(net.visual.state_dict()) == 4 + 4 + 12 * 12
  assert clip.infer_config(state) == clip.PRESETS[clip.DEFAULT_MODEL]


def test_full_size_tower_matches_open_clip():
  torch.manual_seed(0)
  net = open_clip.create_model(clip.DEFAULT_MODEL, pretrained=None).eval()
  with torch.no_grad():
    for p in net.visual.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model = clip.make(clip.DEFAULT_MODEL)
  variables = clip.load_state_dict(model, _state(net))
  x = _reference_input(_slices()[:2], 224)
  with torch.no_grad():
    want = net.encode_image(torch.from_numpy(x), normalize=True).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1)))
  err = np.abs(got - want).max()
  print(f"ViT-B-32: max abs {err:.3g}, relative {err / np.abs(want).max():.3g}")  # 1.6e-7, 1.2e-6
  assert err / np.abs(want).max() <= 1e-5


@pytest.mark.parametrize("size", [(136, 112), (150, 130), (250, 300)])
def test_preprocess_matches_open_clip_transform_on_real_slices(size):
  """(136, 112): the reference's slices, a 2x upscale; (150, 130) a non-integer upscale;
  (250, 300) a shrink (PIL's widened kernel)."""
  slices = _slices(size)
  want = _reference_input(slices, 224).transpose(0, 2, 3, 1)
  fn = jax.jit(clip.preprocess)
  # From the same 8-bit image (min 0, max 255: min-max is the identity): bit for bit up to
  # float32 arithmetic in the normalisation.
  u8 = np.stack([_u8(s) for s in slices]).astype(np.float32)
  np.testing.assert_allclose(fn(u8), want, atol=1e-6, rtol=0)
  # From the z-scored slices: our 8-bit rounding of the min-max scaled image runs in float32,
  # _u8's in float64, and they split a handful of near-tie pixels; there, one 8-bit step.
  got = np.asarray(fn(slices))
  step = 1 / 255 / np.asarray(clip.OPENAI_STD)
  off = np.abs(got - want) > 1e-5
  print(f"{size}: pixels one step off {off.any(-1).sum()} of {off[..., 0].size}")
  assert np.all(np.abs(got - want) <= step * 1.0001)
  assert off.mean() < 1e-3  # measured: 0, 5e-5, 0


def test_preprocess_shapes_and_unquantised_path():
  x = _slices()[:2]
  for q in (True, False):
    y = clip.preprocess(x, 224, quantize=q)
    assert y.shape == (2, 224, 224, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(y[..., 0] * clip.OPENAI_STD[0] + clip.OPENAI_MEAN[0],
                               y[..., 2] * clip.OPENAI_STD[2] + clip.OPENAI_MEAN[2], atol=1e-6)
  # Without quantising, the float image is resized with PIL's weights (no 8-bit steps).
  a, b = (np.asarray(clip.preprocess(x, 224, quantize=q)) for q in (True, False))
  assert 0 < np.abs(a - b).max() < 0.2
  assert clip.REFERENCE_THRESHOLDS == (0.97, 0.99905)
  with pytest.raises(ValueError, match="feed 224x224"):
    m = clip.make()
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def test_semdedup_metric_scores_pairs_as_open_clip(tmp_path, monkeypatch):
  # The registry entry end to end: weights file -> converter -> the reference's input ->
  # cosine of open_clip's normalised image embeddings, at the reference's thresholds.
  import functools  # pylint: disable=g-import-not-at-top
  from deepssim_jax import metrics  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(metrics.BASELINES["semdedup"], "make",
                      lambda ctx: clip.CLIPVision(**TINY, act=ctx["clip_act"]))
  monkeypatch.setitem(metrics.BASELINES["semdedup"], "prepare",
                      functools.partial(clip.preprocess, image_size=TINY["image_size"]))
  net = _tiny_clip("quick_gelu")
  path = str(tmp_path / "open_clip_pytorch_model.bin")
  torch.save(net.state_dict(), path)
  slices = _slices()
  a, b = slices, slices[::-1].copy()
  ctx = {"batch_size": 4, "weights": {"semdedup": path}, "clip_act": "quick_gelu"}
  got = metrics.get("semdedup")(ctx, a, b)
  with torch.no_grad():
    e = net.encode_image(torch.from_numpy(_reference_input(slices, TINY["image_size"])),
                         normalize=True).numpy()
  want = np.sum(e * e[::-1], axis=1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert metrics.reference_thresholds("semdedup") == clip.REFERENCE_THRESHOLDS
  with pytest.raises(fileio.InputError, match=r"--config.eval.weights.semdedup=<open_clip"):
    metrics.get("semdedup")({"batch_size": 4, "weights": {}}, a, b)
