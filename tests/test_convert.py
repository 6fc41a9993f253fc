"""Weight import: torchvision / timm ConvNeXt and the reference's TorchScript embedding nets
(WACV and DeepSSIM++) give the same outputs in JAX as in torch, with the same random weights.

Needs the `parity` extra (torch, torchvision, timm), which .ci/run installs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # installed by .ci/run (extra 'parity'): never skips in CI
torchvision = pytest.importorskip("torchvision")
from torch import nn  # pylint: disable=g-import-not-at-top
from torchvision.models import convnext as tv_convnext  # pylint: disable=g-import-not-at-top

from deepssim_jax import convert, convnext_keys, fileio, models  # noqa: E402

RTOL = 1e-5  # largest |ours - torch| / max |torch| allowed (float32)


def randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random weights at scales where every layer matters (layer scales ~0.3, not 1e-6)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("layer_scale") or name.endswith("gamma"):
        p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=g))
      elif name.endswith(".p"):  # GeM exponents
        p.copy_(2.0 + 2.0 * torch.rand(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_((1.0 if "weight" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.3 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return module.eval()


def diffs(ours, theirs) -> tuple[float, float]:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  err = np.max(np.abs(ours - theirs))
  return float(err), float(err / np.max(np.abs(theirs)))


def report(name, ours, theirs):
  abs_d, rel_d = diffs(ours, theirs)
  print(f"PARITY | {name} | max abs {abs_d:.2e} | max rel {rel_d:.2e}")
  assert rel_d <= RTOL, (name, abs_d, rel_d)


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def images(n=2, h=64, w=48, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, h, w)).astype(np.float32)
  return x, torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)


def backbone_forward(kw, variables, x_nhwc, impl="auto"):
  arch = models.MODELS[kw["name"]](depthwise_impl=impl,
                                   **{k: kw[k] for k in ("depths", "dims") if k in kw})
  return jax.jit(lambda p, x: arch.apply({"params": p}, x))(
      variables["params"]["backbone"], x_nhwc)


@pytest.mark.parametrize("arch, impl", [("convnext_tiny", "auto"), ("convnext_base", "conv")])
def test_torchvision_convnext_matches_torch(tmp_path, arch, impl):
  net = randomize(getattr(torchvision.models, arch)(), seed=1)
  path = str(tmp_path / f"{arch}.pth")
  torch.save(net.state_dict(), path)  # with the ImageNet classifier keys, ignored by name
  kw, variables = convert.load(path, image_size=(64, 48))
  assert kw["format"] == "torchvision" and kw["name"] == arch
  x, xt = images()
  with torch.no_grad():
    want = nhwc(net.features(xt))
  report(f"torchvision {arch} features", backbone_forward(kw, variables, x[..., None].repeat(
      3, -1), impl), want)


def test_timm_safetensors_matches_timm(tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  net = randomize(timm.create_model("convnext_tiny", pretrained=False), seed=2)
  path = str(tmp_path / "model.safetensors")
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
  kw, variables = convert.load(path, image_size=(64, 48))
  assert kw["format"] == "timm" and kw["name"] == "convnext_tiny"
  x, xt = images(seed=3)
  with torch.no_grad():
    want = nhwc(net.forward_features(xt))
  report("timm convnext_tiny features", backbone_forward(kw, variables, x[..., None].repeat(
      3, -1)), want)


# ----------------------------------------------------------------------------- the reference's nets
# Built here from torchvision plus the head the reference describes (module names and layer
# order are what its TorchScript state dicts carry), then TorchScripted.


class WacvEmbedder(nn.Module):
  """convnext features -> average pool -> BatchNorm1d -> Linear -> GELU -> Dropout -> Linear."""

  def __init__(self, backbone: nn.Module, width: int, hidden=512, embed=256, dropout=0.33):
    super().__init__()
    self.feature_extractor = backbone.features
    self.fc = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.BatchNorm1d(width),
                            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                            nn.Linear(hidden, embed))

  def forward(self, x):
    return self.fc(self.feature_extractor(x))


class GeM(nn.Module):

  def __init__(self, p: float = 3.0, eps: float = 1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.ones(1) * p)
    self.eps = eps

  def forward(self, x):
    return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


class PlusPlusEmbedder(nn.Module):
  """DeepSSIM++: four ConvNeXt parts, a GeM each, LayerNorm -> Linear -> GELU -> Dropout ->
  Linear on the concatenation."""

  def __init__(self, backbone: nn.Module, dims, embed=256, dropout=0.1):
    super().__init__()
    f = backbone.features
    self.stage_a, self.stage_b = nn.Sequential(*f[0:2]), nn.Sequential(*f[2:4])
    self.stage_c, self.stage_d = nn.Sequential(*f[4:6]), nn.Sequential(*f[6:8])
    self.gem_a, self.gem_b, self.gem_c, self.gem_d = GeM(), GeM(), GeM(), GeM()
    total = sum(dims)
    hidden = (total + embed) // 2
    self.fc = nn.Sequential(nn.LayerNorm(total), nn.Linear(total, hidden), nn.GELU(),
                            nn.Dropout(dropout), nn.Linear(hidden, embed))

  def forward(self, x):
    a = self.stage_a(x)
    b = self.stage_b(a)
    c = self.stage_c(b)
    d = self.stage_d(c)
    pooled = [self.gem_a(a).flatten(1), self.gem_b(b).flatten(1), self.gem_c(c).flatten(1),
              self.gem_d(d).flatten(1)]
    return self.fc(torch.cat(pooled, dim=1))


def tiny_torchvision(drop=0.0):
  """A torchvision ConvNeXt at test widths (the same classes as convnext_tiny/base)."""
  cfg = [tv_convnext.CNBlockConfig(8, 16, 1), tv_convnext.CNBlockConfig(16, 32, 2),
         tv_convnext.CNBlockConfig(32, 64, 1), tv_convnext.CNBlockConfig(64, None, 1)]
  return tv_convnext.ConvNeXt(cfg, stochastic_depth_prob=drop)


def scripted(net: nn.Module, path: str) -> str:
  torch.jit.script(net).save(path)
  return path


def embed_ours(kw, variables, x, train_mode=False):
  model = models.make_model(kw["name"], **{k: v for k, v in kw.items()
                                           if k not in ("name", "format")})
  if not train_mode:
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x)), None
  out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(0)})
  return np.asarray(out), upd


def l2n(t):
  return torch.nn.functional.normalize(t, dim=1).detach().numpy()


@pytest.mark.parametrize("variant", ["wacv_base", "pp_tiny"])
def test_reference_torchscript_embeddings_match(tmp_path, variant):
  if variant == "wacv_base":
    net = WacvEmbedder(torchvision.models.convnext_base(), 1024)
  else:
    net = PlusPlusEmbedder(torchvision.models.convnext_tiny(), (96, 192, 384, 768))
  net = randomize(net, seed=4)
  path = scripted(net, str(tmp_path / "best_model_jit.pt"))
  with pytest.raises(fileio.InputError, match="TorchScript"):
    convert.load(path)  # runs code: only with the explicit flag
  kw, variables = convert.load(path, torchscript=True, image_size=(64, 48))
  assert kw["format"] == ("wacv" if variant == "wacv_base" else "pp")
  assert kw["head"] == ("wacv" if variant == "wacv_base" else "gem")
  x, xt = images(seed=5)
  with torch.no_grad():
    want = l2n(torch.jit.load(path)(xt))
  if variant == "wacv_base":  # the grouped-conv form compiles fastest for 36 blocks
    kw = {**kw, "depthwise_impl": "conv"}
  got, _ = embed_ours(kw, variables, x)
  report(f"{variant} TorchScript embedding (eval)", got, want)


@pytest.mark.parametrize("head", ["wacv", "gem"])
def test_train_mode_matches_with_drop_path_off(tmp_path, head):
  """BatchNorm in train mode (batch statistics and the running-average update) and the
  rest of the net, with dropout and stochastic depth at 0 on both sides."""
  if head == "wacv":
    net = WacvEmbedder(tiny_torchvision(), 64, hidden=32, embed=16, dropout=0.0)
  else:
    net = PlusPlusEmbedder(tiny_torchvision(), (8, 16, 32, 64), embed=16, dropout=0.0)
  net = randomize(net, seed=6)
  path = scripted(net, str(tmp_path / "net.pt"))
  kw, variables = convert.load(path, torchscript=True, image_size=(32, 32))
  assert kw["name"] == "convnext_base" and kw["depths"] == (1, 2, 1, 1)  # custom widths
  x, xt = images(n=4, h=32, w=32, seed=7)
  net.train()
  want = l2n(net(xt))
  got, upd = embed_ours({**kw, "dropout": 0.0}, variables, x, train_mode=True)
  report(f"{head} head, train mode", got, want)
  if head == "wacv":  # torch momentum 0.1 == flax momentum 0.9
    report("BatchNorm running mean after one train step", upd["batch_stats"]["head"]["bn"]["mean"],
           net.fc[2].running_mean.numpy())
    report("BatchNorm running var after one train step", upd["batch_stats"]["head"]["bn"]["var"],
           net.fc[2].running_var.numpy())


def test_convert_cli_writes_a_checkpoint_every_mode_reads(tmp_path):
  net = randomize(WacvEmbedder(tiny_torchvision(), 64, hidden=32, embed=16), seed=8)
  path = scripted(net, str(tmp_path / "best_model_jit.pt"))
  out = str(tmp_path / "converted")
  prov = convert.convert(path, out, torchscript=True, image_size=(32, 32))
  assert prov["format"] == "wacv" and len(prov["sha256"]) == 64
  with open(os.path.join(out, "converted_from.json")) as f:
    assert json.load(f)["sha256"] == prov["sha256"]
  from deepssim_jax import jobs  # pylint: disable=g-import-not-at-top
  ck = jobs.load_checkpoint(f"{out}:best", "")
  x, xt = images(n=3, h=32, w=32, seed=9)
  with torch.no_grad():
    want = l2n(net(xt))
  got = np.asarray(ck["model"].apply(ck["variables"], x))
  report("converted checkpoint folder (wacv, tiny)", got, want)
  with pytest.raises(fileio.InputError, match="already holds a checkpoint"):
    convert.convert(path, out, torchscript=True, image_size=(32, 32))


# ----------------------------------------------------------------------------- semantics


def test_stochastic_depth_schedule_equals_torchvision():
  for arch, rate, depths in (("convnext_base", 0.5, (3, 3, 27, 3)),
                             ("convnext_tiny", 0.1, (3, 3, 9, 3))):
    net = getattr(torchvision.models, arch)(stochastic_depth_prob=rate)
    theirs = [m.stochastic_depth.p for m in net.modules() if isinstance(m, tv_convnext.CNBlock)]
    np.testing.assert_allclose(models.drop_path_rates(depths, rate), theirs, rtol=1e-12)
  assert load_config("ixi").model.overrides.drop_path_rate == 0.5
  assert load_config("corr").model.overrides.drop_path_rate == 0.5
  pp = load_config("ixi_pp")
  assert pp.model.overrides.drop_path_rate == 0.1 and pp.model.name == "convnext_tiny"


def load_config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_reference_freeze_rule_on_torchvision_names():
  """model.freeze='reference' freezes exactly the parameters whose torchvision name holds a
  0 or a 1, and our torchvision_name inverts the import table on every key."""
  net = torchvision.models.convnext_base()
  names = {n: p.numel() for n, p in net.features.named_parameters()}
  frozen_ref = {n for n in names if "0" in n or "1" in n}
  model = models.make_model("convnext_base")
  params = convert.abstract_variables(model, (32, 32))["params"]
  mask = jax.tree_util.tree_flatten_with_path(convnext_keys.reference_freeze_mask(params))[0]
  ours_frozen, ours_all = set(), set()
  for path, trainable in mask:
    keys = tuple(k.key for k in path)
    if keys[0] == "backbone":
      ours_all.add(convnext_keys.torchvision_name(keys))
      if not trainable:
        ours_frozen.add(convnext_keys.torchvision_name(keys))
  assert ours_all == set(names)
  assert ours_frozen == frozen_ref
  share = sum(names[n] for n in frozen_ref) / sum(names.values())
  assert 0.55 < share < 0.65, share  # "about 59% of the backbone"
  # Every torchvision key maps to the path whose torchvision_name is that key.
  mapped = convnext_keys.map_keys({"features." + n: p.detach().numpy()
                            for n, p in net.features.named_parameters()}, "torchvision")
  assert {convnext_keys.torchvision_name(p[1:]) for p in mapped} == set(names)


def test_export_to_torchvision_round_trips(tmp_path):
  """Our random backbone -> to_torchvision -> torch's load_state_dict(strict) -> same output."""
  model = models.ConvNeXtTiny(depthwise_impl="conv")  # the fastest form to compile
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = model.init(jax.random.key(3), x)["params"]
  params = jax.tree_util.tree_map_with_path(  # layer scales well away from 1e-6
      lambda path, p: jnp.full_like(p, 0.3) if "layer_scale" in str(path) else p, params)
  net = torchvision.models.convnext_tiny().eval()
  state = convnext_keys.to_torchvision(params)
  net.features.load_state_dict({k[len("features."):]: torch.from_numpy(v)
                                for k, v in state.items()}, strict=True)
  with torch.no_grad():
    want = nhwc(net.features(torch.from_numpy(x.transpose(0, 3, 1, 2))))
  report("export to torchvision convnext_tiny", model.apply({"params": params}, x), want)


def test_reference_torchscript_drives_evaluate_and_audit(tmp_path):
  """A user holding the reference's best_model_jit.pt: convert on the command line, then
  --mode=evaluate and --mode=audit with it; the audit's stored embeddings are torch's."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import run_cli  # tests/run_cli.py (pytest puts tests/ on sys.path)
  from deepssim_jax import banks, store  # pylint: disable=g-import-not-at-top
  net = randomize(WacvEmbedder(tiny_torchvision(), 64, hidden=32, embed=16), seed=10)
  src = scripted(net, str(tmp_path / "best_model_jit.pt"))
  conv, work = str(tmp_path / "conv"), str(tmp_path / "work")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  out = subprocess.run([sys.executable, "-m", "deepssim_jax.convert", f"--from={src}",
                        f"--to={conv}", "--image_size=32,32"], cwd=run_cli.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "TorchScript" in out.stderr  # refused without the flag
  out = subprocess.run([sys.executable, "-m", "deepssim_jax.convert", f"--from={src}",
                        f"--to={conv}", "--image_size=32,32", "--torchscript"],
                       cwd=run_cli.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  cfg = "configs/tiny_multihost.py"
  printed = run_cli.run("deepssim_jax.main", cfg, work, "--mode=evaluate",
                        f"--config.eval.metrics=('deepssim@{conv}:best', 'ssim')")
  assert f"deepssim@{conv}:best" in printed
  run_cli.run("deepssim_jax.main", cfg, work, "--mode=audit",
              f"--config.embed.checkpoint={conv}:best", "--config.calibrate.dar.enabled=False")
  with open(os.path.join(work, "audit", "summary.json")) as f:
    summary = json.load(f)
  assert summary["n_synthetic"] > 0
  # The summary records the stores' fingerprints (inputs and settings), not float hashes.
  assert summary["fingerprints"]["training_embeddings"] == store.fingerprint(
      os.path.join(work, "stores", "real"))
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(run_cli.ROOT, cfg))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  real = banks.bank(config.data.real, config, os.path.join(work, "data"), "real")
  ids, emb = store.load_store(os.path.join(work, "stores", "real"))
  order = [list(ids).index(k) for k in real["keys"]]
  with torch.no_grad():
    want = l2n(net(torch.from_numpy(np.asarray(real["images"], np.float32))[:, None]
                   .repeat(1, 3, 1, 1)))
  report("audit store embeddings vs the TorchScript model", np.asarray(emb)[order], want)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = models.make_model("convnext_atto", depthwise_impl="conv")
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32), np.float32))["params"]
  good = convnext_keys.to_torchvision(params["backbone"])

  def load(state, name):
    path = str(tmp_path / f"{name}.safetensors")
    save_file(state, path)
    return convert.backbone_params(path, model, (32, 32))

  loaded = load(good, "good")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(fileio.InputError, match=r"unknown key.*features\.1\.0\.block\.9\.weight"):
    load({**good, "features.1.0.block.9.weight": np.zeros(3, np.float32)}, "extra")
  missing = {k: v for k, v in good.items() if k != "features.3.0.layer_scale"}
  with pytest.raises(fileio.InputError, match="missing.*stages_1/block_0/layer_scale"):
    load(missing, "missing")
  bad = {**good, "features.0.1.weight": np.zeros(5, np.float32)}
  with pytest.raises(fileio.InputError, match=r"shape mismatch.*stem/norm/scale.*\(5,\)"):
    load(bad, "bad")
  with pytest.raises(fileio.InputError, match="none of the ConvNeXt key prefixes"):
    load({"encoder.weight": np.zeros(2, np.float32)}, "foreign")
  with pytest.raises(fileio.InputError, match="no such file"):
    convert.backbone_params(str(tmp_path / "absent.pth"), model, (32, 32))
