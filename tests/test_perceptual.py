"""LPIPS-squeeze (ldm_jax/perceptual.py) against the lpips package and MONAI.

SqueezeNet's ImageNet weights cannot be downloaded here, so both sides get the same random
squeezenet1_1 (seeded, biases randomised too) and LPIPS's real linear heads from the lpips
wheel. The weights go through the converter's command line, as a user's would.
"""

import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
lpips = pytest.importorskip("lpips")

from deepssim_jax import fileio  # noqa: E402
from ldm_jax import perceptual  # noqa: E402

# float32 on both sides; measured relative differences are ~1e-6 (each side is about as
# far from a float64 run of lpips), from different summation orders in the convolutions.
RTOL = 1e-5
# lpips asks torchvision for squeezenet1_1(pretrained=...), deprecated since 0.13.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_squeezenet(seed=0):
  torch.manual_seed(seed)
  net = torchvision.models.squeezenet1_1(weights=None)
  with torch.no_grad():  # torchvision initialises biases to 0: make them count
    for name, p in net.named_parameters():
      if name.endswith("bias"):
        p.uniform_(-0.1, 0.1)
  return net.eval()


def reference_lpips(squeezenet_state):
  """lpips.LPIPS(net="squeeze") with the real heads and the given trunk (no download)."""
  ref = lpips.LPIPS(pretrained=True, net="squeeze", pnet_rand=True, verbose=False)
  ref.net.load_state_dict({k: squeezenet_state[re.sub(r"^slice\d+\.", "features.", k)]
                           for k in ref.net.state_dict()})
  return ref.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lpips")
  state = random_squeezenet().state_dict()
  pth, npz = str(tmp / "squeezenet1_1-random.pth"), str(tmp / "lpips_squeeze.npz")
  torch.save(state, pth)
  # The command line, with --lpips left to default to the installed package's copy.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "ldm_jax.perceptual", f"--squeezenet={pth}",
                  f"--out={npz}"], check=True, cwd=ROOT, env=env, capture_output=True)
  loss = perceptual.make("lpips_squeeze", weights=npz)
  net, variables = perceptual.LPIPSSqueeze(), perceptual.load_weights(npz)
  dist = jax.jit(lambda x, y: net.apply(variables, x, y))
  return {"state": state, "pth": pth, "npz": npz, "ref": reference_lpips(state),
          "loss": jax.jit(loss), "dist": dist, "tmp": tmp}


def pair(shape, lo, seed):
  rng = np.random.default_rng(seed)
  x = rng.uniform(lo, 1.0, shape).astype(np.float32)
  y = np.clip(x + 0.3 * rng.normal(size=shape), lo, 1.0).astype(np.float32)
  return x, y


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.mark.parametrize("shape,lo", [
    ((2, 1, 136, 112), 0.0),  # the reference's slices: grey, [0, 1], normalize=False
    ((2, 3, 64, 64), -1.0),   # LPIPS's own setting: RGB in [-1, 1]
    ((1, 3, 67, 45), -1.0),   # odd sizes: ceil-mode pooling keeps a partial window
    ((1, 1, 25, 27), 0.0),    # the smallest size the network takes
])
def test_distance_matches_lpips(setup, shape, lo):
  x, y = pair(shape, lo, seed=sum(shape))
  with torch.no_grad():
    want = setup["ref"](torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
  got = np.asarray(setup["dist"](nhwc(x), nhwc(y)))
  rel = np.max(np.abs(got - want) / np.abs(want))
  print(f"{shape}: lpips {want}, ours {got}, max abs diff {np.max(np.abs(got - want)):.3g}, "
        f"max rel diff {rel:.3g}")
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(float(setup["loss"](nhwc(x), nhwc(y))), np.mean(want), rtol=RTOL)
  assert np.all(np.asarray(setup["dist"](nhwc(x), nhwc(x))) == 0)


def test_matches_monai(setup, monkeypatch):
  """MONAI's PerceptualLoss as the reference builds it (2-D: no fake 3-D)."""
  monai_perceptual = pytest.importorskip("monai.losses.perceptual")
  import lpips.pretrained_networks as pn  # pylint: disable=g-import-not-at-top

  # MONAI always asks lpips for ImageNet trunk weights (pnet_rand is not exposed) and
  # torchvision would download them: hand it the random trunk instead.
  def squeezenet1_1(pretrained=False, **unused):
    net = torchvision.models.squeezenet1_1(weights=None)
    net.load_state_dict(setup["state"])
    return net
  monkeypatch.setattr(pn, "tv", types.SimpleNamespace(squeezenet1_1=squeezenet1_1))
  loss_fn = monai_perceptual.PerceptualLoss(spatial_dims=2, network_type="squeeze",
                                            is_fake_3d=True, fake_3d_ratio=0.2).eval()
  x, y = pair((2, 1, 136, 112), 0.0, seed=1)
  with torch.no_grad():
    want = float(loss_fn(torch.from_numpy(x), torch.from_numpy(y)))
  got = float(setup["loss"](nhwc(x), nhwc(y)))
  print(f"MONAI {want}, ours {got}, abs diff {abs(got - want):.3g}")
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_gradient_matches_torch(setup):
  x, y = pair((2, 1, 136, 112), 0.0, seed=2)
  g = np.asarray(jax.grad(setup["loss"])(nhwc(x), nhwc(y)))
  assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0
  xt = torch.from_numpy(x).requires_grad_(True)
  torch.mean(setup["ref"](xt, torch.from_numpy(y))).backward()
  want = np.transpose(xt.grad.numpy(), (0, 2, 3, 1))
  err = np.max(np.abs(g - want)) / np.max(np.abs(want))
  print(f"gradient: max |g| {np.max(np.abs(want)):.3g}, max abs diff relative to it {err:.3g}")
  assert err < 1e-4
  g0 = np.asarray(jax.grad(setup["loss"])(nhwc(y), nhwc(y)))
  assert np.all(g0 == 0)
  # A location whose features the ReLUs all switch off: lpips' norm has value 0 there and
  # a NaN gradient (sqrt'(0) * 0); ours the same value and a finite gradient.
  f = jnp.asarray([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
  np.testing.assert_allclose(perceptual.normalize_channels(f), [[0, 0, 0], [.6, .8, 0]],
                             rtol=1e-6)
  gf = jax.grad(lambda a: jnp.sum((perceptual.normalize_channels(a) - 0.1) ** 2))(f)
  assert np.all(np.isfinite(np.asarray(gf)))


def test_converter_names_bad_keys(setup):
  tmp, lin = setup["tmp"], perceptual.default_lpips_path()

  def convert_with(state):
    path = str(tmp / "bad.pth")
    torch.save(state, path)
    return perceptual.convert_weights(path, lin)

  state = dict(setup["state"])
  del state["features.6.expand3x3.bias"]
  with pytest.raises(fileio.InputError, match=r"bad\.pth.*missing.*features\.6\.expand3x3\.bias"):
    convert_with(state)
  state = dict(setup["state"], **{"features.9.squeeze.weight": torch.zeros(48, 256, 3, 3)})
  with pytest.raises(fileio.InputError,
                     match=r"bad\.pth.*mis-shaped.*features\.9\.squeeze\.weight"):
    convert_with(state)
  state = dict(setup["state"], **{"features.13.weight": torch.zeros(1)})
  with pytest.raises(fileio.InputError, match=r"bad\.pth.*unknown.*features\.13\.weight"):
    convert_with(state)
  # LPIPS's own spelling of the trunk, and a missing head in the lpips file.
  ref_state = {"net." + k: v for k, v in setup["ref"].net.state_dict().items()}
  assert convert_with(ref_state).keys() == perceptual.weight_shapes().keys()
  heads = torch.load(lin, map_location="cpu", weights_only=True)
  del heads["lin3.model.1.weight"]
  torch.save(heads, str(tmp / "heads.pth"))
  with pytest.raises(fileio.InputError, match=r"heads\.pth.*missing.*lin3\.model\.1\.weight"):
    perceptual.convert_weights(setup["pth"], str(tmp / "heads.pth"))
  # The .npz reader checks its keys too.
  arrays = dict(np.load(setup["npz"]))
  arrays["lin0/kernel"] = arrays["lin0/kernel"][:10]
  fileio.write_npz(str(tmp / "bad.npz"), **arrays)
  with pytest.raises(fileio.InputError, match=r"bad\.npz.*lin0/kernel"):
    perceptual.load_weights(str(tmp / "bad.npz"))
  with pytest.raises(ValueError, match="at least 25"):
    setup["loss"](jnp.zeros((1, 24, 40, 1)), jnp.zeros((1, 24, 40, 1)))


def test_ssim_term_is_one_minus_scikit_image_ssim_with_the_target_batch_range():
  """"ssim": 1 - the batch mean of SSIM (Gaussian 11 x 11, sigma 1.5, population moments:
  scikit-image's gaussian_weights=True, use_sample_covariance=False) with the data range
  of the whole target batch y; "none": 0; other names are refused."""
  from skimage.metrics import structural_similarity
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 40, 36, 1)).astype(np.float32)
  x[1] *= 3.0  # per-image ranges differ from the batch's, and x's from y's
  y = (0.7 * x + 0.5 * rng.normal(size=x.shape)).astype(np.float32)
  loss = jax.jit(perceptual.make("ssim"))

  def want(a, b):
    dr = float(b.max() - b.min())
    return 1.0 - np.mean([structural_similarity(
        a[i, ..., 0].astype(np.float64), b[i, ..., 0].astype(np.float64), data_range=dr,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for i in range(len(a))])

  for a, b in ((x, y), (y, x)):
    got = float(loss(jnp.asarray(a), jnp.asarray(b)))
    assert got == pytest.approx(want(a, b), abs=1e-5), (got, want(a, b))
  assert abs(float(loss(jnp.asarray(x), jnp.asarray(y))) - want(y, x)) > 1e-3  # y's range
  none = perceptual.make("none")
  assert float(none(jnp.asarray(x), jnp.asarray(y))) == 0.0
  with pytest.raises(ValueError, match="perceptual loss 'lpips'"):
    perceptual.make("lpips")


def test_terms_grow_with_noise_and_lpips_is_symmetric(setup):
  """Both terms grow strictly with the amplitude of one noise pattern; LPIPS-squeeze is
  symmetric (squared feature differences) and a grey image counts as its 3-channel copy
  (broadcast against the ScalingLayer)."""
  rng = np.random.default_rng(6)
  x = rng.uniform(0.0, 1.0, (1, 48, 40, 1)).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  levels = (0.02, 0.05, 0.1, 0.2, 0.4)
  xs = jnp.asarray(np.repeat(x, len(levels), 0))
  ys = jnp.asarray(np.concatenate([x + s * noise for s in levels]))
  d = np.asarray(setup["dist"](ys, xs))
  assert np.all(np.diff(d) > 0), d
  ssim = jax.jit(perceptual.make("ssim"))
  s = [float(ssim(ys[i:i + 1], xs[i:i + 1])) for i in range(len(levels))]
  assert np.all(np.diff(s) > 0) and s[0] > 0, s
  np.testing.assert_allclose(np.asarray(setup["dist"](xs, ys)), d, rtol=RTOL, atol=1e-7)
  rgb = lambda a: jnp.repeat(a, 3, axis=-1)  # noqa: E731
  np.testing.assert_allclose(np.asarray(setup["dist"](rgb(ys), rgb(xs))), d, rtol=RTOL,
                             atol=1e-7)
