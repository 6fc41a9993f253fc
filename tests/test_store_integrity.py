"""No silent wrong answers from embedding stores (issue 12).

A store is reused only when what it was made from (source ids and their number, shard_rows,
image size, checkpoint, dtype) matches; it is complete only when its rows are its source's;
readers refuse anything else, naming the folder and counts; a killed embed or match resumes
to the same answer; fingerprints hash inputs, not float embeddings. Jobs run in-process on
configs/tiny_multihost.py's demo data (16 training, 20 synthetic images at 32x32) with an
untrained tiny model written as a checkpoint folder; one subprocess checks that the
DEEPSSIM_STOP_AFTER_SHARDS hook stops the command line like a kill.
"""

import functools
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepssim_jax import convert, embed, fileio, jobs, match, models, store

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIG = os.path.join(ROOT, "configs", "tiny_multihost.py")
MODEL = dict(name="convnext_atto", head="wacv", hidden_dim=16, embed_dim=8,
             depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An untrained tiny model as a checkpoint folder every mode reads (`<dir>:best`)."""
  out = str(tmp_path_factory.mktemp("ckpt"))
  kw = {k: v for k, v in MODEL.items() if k != "name"}
  model = models.make_model(MODEL["name"], depthwise_impl="conv", **kw)
  v = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), np.zeros((1, 32, 32), np.float32))
  convert.write_checkpoint(out, MODEL, v, (32, 32), {"source": "test"})
  with open(os.path.join(out, "config.json")) as f:
    c = json.load(f)
  c["model"]["overrides"]["depthwise_impl"] = "conv"  # compiles ~5x faster on CPU
  fileio.write_json(os.path.join(out, "config.json"), c)
  return out


def _config(checkpoint, workdir, **embed_kw):
  spec = importlib.util.spec_from_file_location("tiny_multihost", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.embed.update(dict(checkpoint=f"{checkpoint}:best", batch_size=4, shard_rows=4,
                      num_threads=1, dir=os.path.join(workdir, "stores")), **embed_kw)
  c.match.k = 3
  return c


def _snapshot(folder):
  """{file: sha256} of a folder's files (temporary files of atomic writes aside)."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".tmp"):
      with open(os.path.join(folder, name), "rb") as f:
        out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


def _index(folder):
  with open(os.path.join(folder, "index.json")) as f:
    return json.load(f)


def _killed(c, workdir, job, n, monkeypatch):
  """Runs a job with the DEEPSSIM_STOP_AFTER_SHARDS=n hook; it must stop like a kill."""
  monkeypatch.setenv(embed.STOP_ENV, str(n))
  with pytest.raises(embed.StoppedByTestHook, match=f"after writing {n} shard"):
    job(c, workdir)
  monkeypatch.delenv(embed.STOP_ENV)


def test_killed_embed_rerun_with_another_shard_rows_rebuilds_complete(checkpoint, tmp_path,
                                                                      monkeypatch):
  workdir = str(tmp_path)
  c = _config(checkpoint, workdir)
  c.embed.sets = ("real",)
  folder = jobs.store_folder(c, workdir, "real")
  _killed(c, workdir, jobs.embed_job, 2, monkeypatch)
  index = _index(folder)
  assert index["status"] == "partial" and index["n_rows"] == 8
  assert index["meta"]["identity"]["n_source"] == 16
  assert index["meta"]["identity"]["shard_rows"] == 4
  with pytest.raises(fileio.InputError, match="partial"):
    store.load_store(folder)

  # The store: an older version marked it complete with 8 of 16 rows and no
  # identity. Every reader refuses it, naming the folder and both counts...
  legacy = dict(index, status="complete",
                meta={k: v for k, v in index["meta"].items() if k != "identity"})
  fileio.write_json(os.path.join(folder, "index.json"), legacy)
  before = _snapshot(folder)
  for read in (store.load_store, store.read_index, lambda f: list(store.iter_store_blocks(f, 4)),
               lambda f: match.match_stores(f, f, str(tmp_path / "m.csv"), 1)):
    with pytest.raises(fileio.InputError,
                       match=re.escape(f"{folder}: marked complete but has 8 rows for 16")):
      read(folder)
  assert _snapshot(folder) == before and not os.path.exists(tmp_path / "m.csv")

  # ...and the rerun with the default shard_rows rebuilds it: complete, all 16 rows.
  c.embed.shard_rows = 4096
  r = jobs.embed_job(c, workdir)["real"]
  assert r["complete"] and r["written"] == 1 and r["skipped"] == 0
  index = _index(folder)
  assert index["status"] == "complete" and index["n_rows"] == 16
  assert [s["file"] for s in index["shards"]] == ["shard-00000.npz"]
  assert sorted(os.listdir(folder)) == ["index.json", "shard-00000.npz"]
  ids, emb = store.load_store(folder, source_ids=r["ids"])
  assert ids.tolist() == r["ids"].tolist() and emb.shape == (16, 8)

  # A complete store is not rebuilt for another layout: refused, naming shard_rows, and
  # untouched.
  before = _snapshot(folder)
  c.embed.shard_rows = 4
  with pytest.raises(fileio.InputError,
                     match="shard_rows 4096 -> 4; set embed.shard_rows=4096 to use it"):
    jobs.embed_job(c, workdir)
  assert _snapshot(folder) == before
  # The same settings again: nothing written, nothing changed.
  c.embed.shard_rows = 4096
  assert jobs.embed_job(c, workdir)["real"]["written"] == 0
  assert _snapshot(folder) == before


def test_store_of_other_rows_than_its_source_is_refused(checkpoint, tmp_path):
  workdir = str(tmp_path)
  c = _config(checkpoint, workdir)
  c.embed.sets = ("real",)
  r = jobs.embed_job(c, workdir)["real"]
  folder, src = r["folder"], r["ids"]
  assert r["complete"] and len(src) == 16
  before = _snapshot(folder)

  # The source gained images (5 slices per head, not 4): every mode that needs the store
  # (embed, the audit's embeddings, match) refuses it, naming the folder and the counts.
  c.data.demo.slices_per_head = 5
  for run in (lambda: jobs.embed_job(c, workdir),
              lambda: jobs.set_embeddings(c, workdir, "real"),
              lambda: jobs.match_job(c, workdir)):
    with pytest.raises(fileio.InputError, match=re.escape(folder) + ".*n_source 16 -> 20"):
      run()
  assert _snapshot(folder) == before

  # Readers given the source's ids: fewer images, more, or the same number of others.
  for ids, want in ((src[:-2], " has 16 rows but its image set now has 14"),
                    (np.append(src, "extra/z999"), " has 16 rows but its image set now has 17"),
                    (src[::-1], "'s 16 ids are not the 16 ids")):
    with pytest.raises(fileio.InputError, match=re.escape(f"{folder}: the store{want}")):
      store.load_store(folder, source_ids=ids)
    with pytest.raises(fileio.InputError, match=re.escape(f"{folder}: the store{want}")):
      match.match_stores(folder, folder, str(tmp_path / "m.csv"), 1, ref_ids=ids)
  # An index that says complete while a shard is gone: n_rows differs from the source.
  index = _index(folder)
  index["shards"], index["n_rows"] = index["shards"][:-1], 12
  fileio.write_json(os.path.join(folder, "index.json"), index)
  short = re.escape(f"{folder}: marked complete but has 12 rows for 16")
  with pytest.raises(fileio.InputError, match=short):
    store.load_store(folder)
  with pytest.raises(fileio.InputError, match=short):
    match.match_stores(folder, folder, str(tmp_path / "m.csv"), 1)
  assert not os.path.exists(tmp_path / "m.csv")
  # finalize never marks a store complete whose rows are not its source's.
  with pytest.raises(fileio.InputError, match="16 rows but its source has 20 images"):
    store.finalize(folder, index["meta"], source_ids=np.append(src, ["a", "b", "c", "d"]))


def test_killed_match_resumes_to_the_uninterrupted_top_k(checkpoint, tmp_path, monkeypatch):
  whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
  c = _config(checkpoint, whole)
  res = jobs.match_job(c, whole)
  with open(res["path"], "rb") as f:
    want = f.read()

  # Killed while embedding the synthetic images (2 of 5 shards): the rerun of the match
  # finishes the partial store, writes the training store, and finds the same top-k.
  c = _config(checkpoint, part)
  _killed(c, part, jobs.match_job, 2, monkeypatch)
  synth = jobs.store_folder(c, part, "synth")
  assert _index(synth)["status"] == "partial" and _index(synth)["n_rows"] == 8
  assert not os.path.exists(os.path.join(part, "match"))
  kept = _snapshot(synth)
  del kept["index.json"]
  res = jobs.match_job(c, part)
  assert res["n_query"] == 20 and res["n_ref"] == 16
  with open(res["path"], "rb") as f:
    assert f.read() == want
  now = _snapshot(synth)
  assert {k: now[k] for k in kept} == kept  # the shards written before the kill are kept
  for name in ("real", "synth"):
    a, b = (jobs.store_folder(c, w, name) for w in (whole, part))
    np.testing.assert_array_equal(store.load_store(a)[1], store.load_store(b)[1])


def test_fingerprints_hash_inputs_not_float_embeddings(checkpoint, tmp_path):
  """The same images embedded with batches of 4 and 12 (and shards of 4 and 16) record
  the same fingerprint, while their embeddings may differ in the last bits."""
  workdir = str(tmp_path)
  fps, embs = [], []
  for batch, rows in ((4, 4), (12, 16)):
    c = _config(checkpoint, workdir, batch_size=batch, shard_rows=rows,
                dir=str(tmp_path / f"b{batch}"))
    c.embed.sets = ("real",)
    jobs.embed_job(c, workdir)
    folder = jobs.store_folder(c, workdir, "real")
    fps.append(store.fingerprint(folder))
    embs.append(store.load_store(folder)[1])
    ident = _index(folder)["meta"]["identity"]
    assert ident["shard_rows"] == rows and "batch_size" not in ident
  assert fps[0] == fps[1]
  np.testing.assert_allclose(embs[0], embs[1], atol=1e-5)


def test_stop_hook_exits_the_command_line_like_a_kill(checkpoint, tmp_path):
  """--mode=embed under DEEPSSIM_STOP_AFTER_SHARDS=1 exits non-zero after one shard,
  leaving a partial store that the in-process rerun completes."""
  workdir = str(tmp_path)
  stores = os.path.join(workdir, "stores")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             **{embed.STOP_ENV: "1"})
  cmd = [sys.executable, "-m", "deepssim_jax.main", f"--config={CONFIG}",
         f"--workdir={workdir}", "--mode=embed", f"--config.embed.checkpoint={checkpoint}:best",
         "--config.embed.batch_size=4", "--config.embed.shard_rows=4",
         "--config.embed.num_threads=1", f"--config.embed.dir={stores}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == embed.STOP_EXIT_CODE, out.stderr[-3000:]
  assert f"{embed.STOP_ENV}=1: stopped after writing 1 shard" in out.stderr
  real = os.path.join(stores, "real")
  assert _index(real)["status"] == "partial" and _index(real)["n_rows"] == 4
  assert not os.path.exists(os.path.join(stores, "synth"))  # nothing ran after the "kill"
  c = _config(checkpoint, workdir)
  r = jobs.embed_job(c, workdir)
  assert r["real"]["skipped"] == 1 and r["real"]["written"] == 3 and r["synth"]["written"] == 5
  assert all(store.is_complete(_index(os.path.join(stores, n))) for n in ("real", "synth"))
