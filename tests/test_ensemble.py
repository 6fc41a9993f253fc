"""Ensembles (models.Ensemble): several separately trained networks scored as one, whose
cosine is the mean of the members' cosines; joined into one model file by
deepssim_jax.pretrained.export and loaded like any model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepssim_jax
from deepssim_jax import config_lib, convert, explain, fileio, models, pretrained, validate
from deepssim_jax.data import demo

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), hidden_dim=16, embed_dim=8)


def _images(n, seed, size=(32, 32)):
  x = np.random.default_rng(seed).normal(size=(n, *size)).cumsum(1).cumsum(2)
  return jnp.asarray((x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True),
                     jnp.float32)


def test_ensemble_embedding_is_the_scaled_concatenation_and_its_cosine_the_mean():
  member = lambda: models.make_model("convnext_atto", **TINY)
  ens = models.Ensemble(members=(member(), member(), member()))
  x, y = _images(5, 0), _images(5, 1)
  v = ens.init(jax.random.key(0), x)
  assert sorted(v["params"]) == ["members_0", "members_1", "members_2"]
  e = ens.apply(v, x)
  assert e.shape == (5, 3 * TINY["embed_dim"])
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  parts = [member().apply({c: v[c][f"members_{i}"] for c in v}, x) for i in range(3)]
  split = models.members(ens, v)
  assert len(split) == 3 and models.members(split[0][0], split[0][1]) == [split[0]]
  for (m, mv), p in zip(split, parts):
    np.testing.assert_allclose(m.apply(mv, x), p, atol=1e-6)
  np.testing.assert_allclose(e, np.concatenate(parts, axis=1) / np.sqrt(3), atol=1e-6)
  # The members were initialised differently, and the ensemble's cosine is their mean.
  assert not np.allclose(parts[0], parts[1])
  f = ens.apply(v, y)
  want = np.mean([np.sum(p * member().apply({c: v[c][f"members_{i}"] for c in v}, y), axis=1)
                  for i, p in enumerate(parts)], axis=0)
  np.testing.assert_allclose(np.sum(e * f, axis=1), want, atol=1e-5)
  assert ens.backbone.dims == TINY["dims"]
  # bfloat16 members keep the parameter tree.
  e16 = models.with_dtype(ens, "bfloat16").apply(v, x)
  np.testing.assert_allclose(e16, e, atol=3e-2)


def test_export_joins_runs_into_one_model_that_loads_and_scores_as_their_mean(tmp_path):
  base = deepssim_jax.load("builtin")
  kw = {"name": base.config.model.name, "head": base.config.model.head,
        **dict(base.config.model.overrides)}
  v0 = jax.device_get(models.members(base.model, base.variables)[0][1])  # one network
  v1 = {"params": jax.tree.map(lambda p: p * 1.1, v0["params"]),
        "batch_stats": v0["batch_stats"]}
  runs = []
  for i, v in enumerate((v0, v1)):
    runs.append(str(tmp_path / f"run{i}"))
    convert.write_checkpoint(runs[-1], kw, v, base.image_size, {"test": i})
  out = str(tmp_path / "ensemble.npz")
  meta = pretrained.export(runs, "best", out)
  assert [m["step"] for m in meta["members"]] == [0, 0] and len(meta["source"]) == 2
  ens = deepssim_jax.load(out)
  assert isinstance(ens.model, models.Ensemble) and ens.config.model.ensemble == 2
  singles = [deepssim_jax.load(r) for r in runs]
  vol = ens.read(demo.MRI_DIR + "/colin27-T1.nii.gz")[1][::8][:6]
  e = ens.embed(vol)
  parts = [m.embed(vol) for m in singles]
  assert not np.allclose(parts[0], parts[1], atol=1e-3)
  np.testing.assert_allclose(e, np.concatenate(parts, axis=1) / np.sqrt(2), atol=1e-5)
  want = np.mean([p @ p.T for p in parts], axis=0)
  np.testing.assert_allclose(ens.similarity(vol, vol), want, atol=1e-5)
  assert ens.score(vol[0], vol[1]) == pytest.approx(
      np.mean([m.score(vol[0], vol[1]) for m in singles]), abs=1e-5)
  top = ens.nearest(vol[:2], vol, k=2)
  np.testing.assert_array_equal(top["indices"][:, 0], [0, 1])
  # Occlusion explains an ensemble; LayerCAM (one network's stages) refuses by name.
  ma, mb = ens.explain(vol[0], vol[2])
  assert ma.shape == mb.shape == ens.image_size and 0 <= ma.min() <= ma.max() <= 1
  with pytest.raises(ValueError, match="an ensemble of 2 is explained by method 'occlusion'"):
    explain.pair_maps(ens.model, ens.variables, vol[0], vol[2], method="layercam")

  # Runs of other models, or other image sizes, are not joined.
  other = str(tmp_path / "other")
  convert.write_checkpoint(other, {**kw, "embed_dim": 32}, _init(kw, 32, base.image_size),
                           base.image_size, {"test": 2})
  with pytest.raises(fileio.InputError, match="config.model differs from"):
    pretrained.export([runs[0], other], "best", str(tmp_path / "bad.npz"))
  assert not (tmp_path / "bad.npz").exists()
  # A run saved before model.ensemble existed still joins one that has it.
  path = os.path.join(runs[1], "config.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["model"].pop("ensemble") == 1
  with open(path, "w") as f:
    json.dump(saved, f)
  assert len(pretrained.export(runs, "best", str(tmp_path / "old.npz"))["members"]) == 2


def _init(kw, embed_dim, size):
  m = models.make_model(kw["name"], head=kw["head"], depths=tuple(kw["depths"]),
                        dims=tuple(kw["dims"]), hidden_dim=kw["hidden_dim"],
                        embed_dim=embed_dim)
  return jax.device_get(m.init(jax.random.key(1), jnp.zeros((1, *size))))


def test_a_run_does_not_train_an_ensemble():
  c = config_lib.base_config()
  c.model.ensemble = 2
  validate.check_deepssim(c, "embed")  # reading an exported ensemble is fine
  with pytest.raises(validate.ConfigError, match=r"config.model.ensemble must be 1 to train "
                     r"\(a run trains one network\): train the members as separate runs"):
    validate.check_deepssim(c, "train")
  c.model.ensemble = 0
  with pytest.raises(validate.ConfigError, match="config.model.ensemble must be >= 1"):
    validate.check_deepssim(c, "embed")
