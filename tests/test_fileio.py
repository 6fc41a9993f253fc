"""Atomic writers, validated readers and batch padding/sharding helpers."""

import os

import jax
import numpy as np
import pytest

from deepssim_jax import fileio, parallel


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "out.csv"
  fileio.write_csv(path, ["a", "b"], [[1, 0.5]])
  before = path.read_text()

  def rows():
    yield [2, 0.25]
    raise RuntimeError("killed mid-write")

  with pytest.raises(RuntimeError):
    fileio.write_csv(path, ["a", "b"], rows())
  assert path.read_text() == before
  assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left behind


def test_csv_round_trip_and_float_precision(tmp_path):
  path = tmp_path / "t.csv"
  x = 0.1234567890123
  fileio.write_csv(path, ["key", "v"], [["k0", x], ["k1", np.float32(2.5)]])
  table = fileio.read_csv(path, required=["key", "v"])
  assert table["key"] == ["k0", "k1"]
  np.testing.assert_array_equal(fileio.float_column(path, table, "v"), [x, 2.5])


def test_read_csv_errors_name_file_and_problem(tmp_path):
  path = tmp_path / "pairs.csv"
  path.write_text("real_key,ssim\nA,0.5\n")
  with pytest.raises(fileio.InputError, match=r"pairs\.csv.*missing column.*synth_key"):
    fileio.read_csv(path, required=["real_key", "synth_key"])
  with pytest.raises(fileio.InputError, match="file not found"):
    fileio.read_csv(tmp_path / "nope.csv")
  (tmp_path / "empty.csv").write_text("")
  with pytest.raises(fileio.InputError, match=r"empty\.csv.*empty"):
    fileio.read_csv(tmp_path / "empty.csv")
  path.write_text("k,v\nA,nan\n")
  with pytest.raises(fileio.InputError, match="line 2.*non-finite"):
    fileio.float_column(path, fileio.read_csv(path), "v")
  path.write_text("k,v\nA,abc\n")
  with pytest.raises(fileio.InputError, match="not a number"):
    fileio.float_column(path, fileio.read_csv(path), "v")


def test_fingerprint_is_stable_and_content_sensitive():
  a = np.arange(6, dtype=np.float32)
  assert fileio.fingerprint("x", a) == fileio.fingerprint("x", a.copy())
  assert fileio.fingerprint("x", a) != fileio.fingerprint("x", a + 1)
  assert fileio.fingerprint("x", a) != fileio.fingerprint("x", a.astype(np.float64))


def test_pad_to_repeats_last_row():
  x = np.arange(6).reshape(3, 2)
  y = parallel.pad_to(x, 5)
  np.testing.assert_array_equal(y[:3], x)
  np.testing.assert_array_equal(y[3:], [[4, 5], [4, 5]])
  with pytest.raises(ValueError, match="does not fit"):
    parallel.pad_to(x, 2)


def test_shard_batch_spreads_rows_over_the_mesh():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 4  # conftest's fake devices
  batch = {"x": np.arange(8, dtype=np.float32).reshape(8, 1)}
  out = parallel.shard_batch(batch, mesh)
  assert len(out["x"].addressable_shards) == 4
  assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 1)}
  np.testing.assert_array_equal(jax.device_get(out["x"]), batch["x"])
  with pytest.raises(ValueError, match="not divisible"):
    parallel.local_batch_size(6, mesh)


def test_atomic_files_get_the_usual_permissions(tmp_path):
  path = tmp_path / "report.html"
  fileio.write_text(str(path), "<p>hi</p>")
  mask = os.umask(0o022)
  os.umask(mask)
  assert (path.stat().st_mode & 0o777) == 0o666 & ~mask  # not mkstemp's 0600


def test_json_ready_makes_results_strict_json():
  """numpy scalars and arrays become Python values, NaN/inf become null, keys become str:
  json.dumps(allow_nan=False) accepts the result and reads back the same values."""
  import json
  obj = {1: np.float32(0.5), "a": [np.int64(3), float("nan"), (np.float64(np.inf), 2)],
         "arr": np.array([[1.5, np.nan]]), "s": "x", "none": None, "b": np.bool_(True)}
  out = fileio.json_ready(obj)
  text = json.dumps(out, allow_nan=False)
  assert json.loads(text) == {"1": 0.5, "a": [3, None, [None, 2]], "arr": [[1.5, None]],
                              "s": "x", "none": None, "b": True}
  assert type(out["1"]) is float and type(out["a"][0]) is int


def test_key_rows_finds_keys_in_either_spelling_and_names_what_is_wrong():
  """The one key lookup: rows of keys among ids, `<uid>/<name>` and `<uid>___<name>` alike
  on either side; ambiguous ids and missing keys refused with the set, file and row."""
  ids = np.array(["u1/training", "u2___gen-3", "flat"])
  rows = fileio.key_rows(ids, ["u2/gen-3", "u1___training", "flat", "u1/training"], "set")
  assert rows.dtype == np.int64 and rows.tolist() == [1, 0, 2, 0]
  assert fileio.key_rows(ids, [], "set").shape == (0,)
  assert fileio.key_rows(["a", "b", "a"], ["a"], "set").tolist() == [2]  # as a dict would
  with pytest.raises(fileio.InputError,
                     match=r"^bank\.npz: ids 'u1/training' and 'u1___training' name the same"):
    fileio.key_rows(["u1/training", "x", "u1___training"], ["x"], "bank.npz")
  with pytest.raises(fileio.InputError, match=r"^store: key 'u3___gen-1' not found \(3 ids, "
                     r"e\.g\. \['u1/training', 'u2___gen-3', 'flat'\]\)"):
    fileio.key_rows(ids, ["flat", "u3___gen-1"], "store")
  with pytest.raises(fileio.InputError,
                     match=r"^t\.csv: key 'zz' \(row 3\) is not in the real image set"):
    fileio.key_rows(ids, ["flat", "zz"], "the real image set", csv_file="t.csv")
  assert fileio.key_rows(ids, ["zz", "u2/gen-3"], "set", missing=-1).tolist() == [-1, 1]
