"""ResNet-50 baselines (SSCD, Dar) against torchvision with the same random weights."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from deepssim_jax import fileio, resnet

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


class _GeM(torch.nn.Module):  # the reference's src/utils/gem.py, p=3, eps=1e-6

  def forward(self, x):
    return torch.nn.functional.avg_pool2d(
        x.clamp(min=1e-6).pow(3.0), (x.size(-2), x.size(-1))).pow(1.0 / 3.0)


def _torch_net(head: str, seed: int = 0):
  """torchvision resnet50 built as the reference builds it, randomised BN running stats."""
  torch.manual_seed(seed)
  net = torchvision.models.resnet50(weights=None)
  if head == "dar":  # DarFeatureExtractor: 1-channel stem, fc -> Linear(2048, 128)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3),
                                bias=False)
    net.fc = torch.nn.Linear(2048, 128)
  else:  # SSCD's torchvision layout: GeM for avgpool, fc = the projection
    net.avgpool = _GeM()
    net.fc = torch.nn.Linear(2048, 512)
  g = torch.Generator().manual_seed(seed + 1)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.weight.data.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
  return net.eval()


def _images(c: int, n: int = 3, size: int = 64) -> np.ndarray:
  """Smooth, brain-like blobs rather than white noise."""
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    r = np.sqrt((xx - rng.normal(0, .05)) ** 2 + (yy - rng.normal(0, .05)) ** 2)
    img = np.exp(-(r / 0.3) ** 4) * (1 + 0.2 * np.sin(20 * xx * rng.uniform(.5, 1.5)))
    out.append(np.stack([img] * c, 0))
  return np.asarray(out, np.float32)


def _parity(head, c, model):
  net = _torch_net(head)
  x = _images(c)
  with torch.no_grad():
    want = torch.nn.functional.normalize(net(torch.from_numpy(x)), dim=1).numpy()
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  if head == "dar":  # the reference's file: trunk under `model.`, plus the unused fc_end
    state = {"model." + k: v for k, v in state.items()}
    state["fc_end.weight"], state["fc_end.bias"] = np.zeros((1, 128)), np.zeros(1)
  variables = resnet.load_state_dict(model, state, c)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  err = np.abs(got - want).max()
  rel = err / np.abs(want).max()
  print(f"{head}: max abs diff {err:.3g}, relative {rel:.3g}")
  assert got.shape == want.shape
  assert rel <= 1e-5


def test_sscd_matches_torch():
  _parity("gem_proj", 3, resnet.SSCD())


def test_dar_matches_torch():
  _parity("dar", 1, resnet.Dar())


def test_bad_state_dict_names_the_key():
  state = {k: v.numpy() for k, v in _torch_net("dar").state_dict().items()}
  broken = dict(state)
  del broken["layer2.1.bn2.running_var"]
  with pytest.raises(fileio.InputError, match="layer2_1/bn2/var"):
    resnet.load_state_dict(resnet.Dar(), broken, 1)
  broken = dict(state, **{"layer3.0.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)})
  with pytest.raises(fileio.InputError, match="layer3_0/conv2/kernel"):
    resnet.load_state_dict(resnet.Dar(), broken, 1)
  broken = dict(state, **{"layer9.0.conv1.weight": np.zeros(1, np.float32)})
  with pytest.raises(fileio.InputError, match="layer9.0.conv1.weight"):
    resnet.load_state_dict(resnet.Dar(), broken, 1)


def test_torchscript_needs_the_flag(tmp_path):
  net = torch.nn.Sequential(torch.nn.Linear(2, 2))
  path = str(tmp_path / "m.torchscript.pt")
  torch.jit.script(net).save(path)
  with pytest.raises(fileio.InputError, match="TorchScript"):
    resnet.load(path, resnet.SSCD(), 3)


def test_metric_without_weights_says_what_to_download():
  from deepssim_jax import config_lib, metrics  # pylint: disable=g-import-not-at-top
  ctx = {"batch_size": 2, "weights": config_lib.base_config().eval.weights}
  x = _images(1)[:, 0]
  with pytest.raises(fileio.InputError,
                     match=r"--config.eval.weights.sscd=<sscd_disc_mixup.torchvision.pt"):
    metrics.get("sscd")(ctx, x, x)
  with pytest.raises(fileio.InputError, match=r"--config.eval.weights.dar="):
    metrics.get("dar")({"batch_size": 2}, x, x)


def test_dar_metric_scores_pairs_from_a_pth(tmp_path):
  from deepssim_jax import metrics  # pylint: disable=g-import-not-at-top
  net = _torch_net("dar")
  state = {"model." + k: v for k, v in net.state_dict().items()}
  state["fc_end.weight"], state["fc_end.bias"] = torch.zeros(1, 128), torch.zeros(1)
  path = str(tmp_path / "dar.pth")
  torch.save(state, path)
  x = _images(1, n=3)[:, 0] * 3 - 1  # any affine scale: the input is min-max scaled
  a, b = x, x[[0, 2, 1]]
  got = metrics.get("dar")({"batch_size": 2, "weights": {"dar": path}}, a, b)
  with torch.no_grad():
    u = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
    u = np.round(u * 255.0) / 255.0  # the 8-bit PNG the reference reads
    e = torch.nn.functional.normalize(net(torch.from_numpy(u[:, None])), dim=1).numpy()
  want = [np.corrcoef(e[i], e[j])[0, 1] for i, j in [(0, 0), (1, 2), (2, 1)]]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got[0] == pytest.approx(1.0, abs=1e-6)


class _SSCDModel(torch.nn.Module):
  """The released SSCD TorchScript's module layout (facebookresearch/sscd-copy-detection,
  sscd/models/model.py, TV_RESNET50): a torchvision resnet50 as `backbone` with GeM as its
  avgpool and fc the 512-d projection, then an L2 normalisation."""

  def __init__(self):
    super().__init__()
    self.backbone = _torch_net("gem_proj")

  def forward(self, x):
    return torch.nn.functional.normalize(self.backbone(x))


def test_sscd_torchscript_layout_loads_with_the_flag(tmp_path):
  # The reference loads sscd_disc_mixup.torchscript.pt; its state dict is the module above
  # (keys under backbone.). Converted with weights_torchscript, our embeddings equal the
  # scripted module's.
  net = _SSCDModel().eval()
  path = str(tmp_path / "sscd_disc_mixup.torchscript.pt")
  torch.jit.script(net).save(path)
  x = _images(3)
  with torch.no_grad():
    want = torch.jit.load(path)(torch.from_numpy(x)).numpy()
  model = resnet.SSCD()
  variables = resnet.load(path, model, 3, torchscript=True)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_baseline_inputs_equal_the_reference_monai_transforms():
  # The reference's factories on the 8-bit PNG it reads: SSCD / UMS-SSCD Resize((288, 288))
  # (MONAI's default area mode) of the RGB uint8 image, /255, NormalizeIntensity with the
  # ImageNet means as both mean and std, channel-wise; Dar: ScaleIntensity at native size.
  monai_t = pytest.importorskip("monai.transforms")
  from deepssim_jax import metrics  # pylint: disable=g-import-not-at-top
  from deepssim_jax.data import demo  # pylint: disable=g-import-not-at-top
  slices = demo.demo_sets(size=(136, 112), slices_per_head=1, num_copies=1, num_neighbours=1,
                          num_other=1, heldout_per_head=0)["training"]["images"][:3]
  m = np.array([0.485, 0.456, 0.406], np.float32)
  sscd = monai_t.Compose([
      monai_t.Resize((288, 288)), monai_t.EnsureType(dtype=np.float32),
      monai_t.Lambda(lambda x: x / 255.0),
      monai_t.NormalizeIntensity(m, m, channel_wise=True)])
  dar = monai_t.ScaleIntensity()
  for x in slices:
    u8 = np.round((x - x.min()) / np.ptp(x) * 255.0).astype(np.uint8)  # the PNG
    want = np.asarray(sscd(np.repeat(u8[None], 3, 0))).transpose(1, 2, 0)
    got = np.asarray(metrics.minmax_input(jnp.asarray(x[None]), (288, 288), True))[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    want = np.asarray(dar(u8[None].astype(np.float32)))[0]
    got = np.asarray(metrics.minmax_input(jnp.asarray(x[None]), None, False))[0, ..., 0]
    np.testing.assert_allclose(got, want, atol=1e-6)
