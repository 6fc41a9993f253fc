"""The reference's full score matrix, and labelled pairs scored the way its eval.py scores them.

The reference (scripts/compute_matrix.py) forms the whole training x synthetic cosine matrix
in float16 and saves it with two index files; its scripts/eval.py reads
matrix[real_pos, synth_pos] for each labelled (real_key, synth_key) pair of a test set. For
sets small enough to hold it, `full_matrix` computes that matrix on the devices and
`write_reference_npz` writes it in that layout, so eval.py reads our output as its own;
`read_reference_matrix` reads ours or the reference's back (ids in our spelling) and
`matrix_scores` scores labelled pairs from it. `pair_scores` scores the same pairs straight
from two sets of embeddings. The audit's nearest-neighbour search never forms the matrix:
that is deepssim_jax.match.
"""

import os
import zipfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from deepssim_jax import fileio, match, parallel


@jax.jit
def _cosine_block(a, b):
  return jnp.dot(a, b.T, precision=match.PRECISION,
                 preferred_element_type=jnp.float32).astype(jnp.float16)


def full_matrix(real_emb: np.ndarray, synth_emb: np.ndarray, block: int = 1024,
                mesh: Optional[Mesh] = None, normalize_rows: bool = True) -> np.ndarray:
  """The reference's full cosine matrix, for small sets: rows real, columns synthetic.

  Args:
    real_emb: (Nr, d) training-image embeddings (matrix rows).
    synth_emb: (Ns, d) synthetic-image embeddings (matrix columns).
    block: real rows per device per step.
    mesh: 1-D "data" mesh (real rows sharded, synthetic replicated); default local devices.
    normalize_rows: normalise both sides (True) or only check unit norms.

  Returns:
    (Nr, Ns) float16 cosine similarities (the reference's compute_matrix(train, synth)).
  """
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  a = match.normalize(real_emb, "real", normalize_rows)
  b = match.normalize(synth_emb, "synth", normalize_rows)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"real dimension {a.shape[1]} differs from synthetic {b.shape[1]}")
  out = np.empty((len(a), len(b)), np.float16)
  if not len(a) or not len(b):
    return out
  rows = block * mesh.devices.size
  b_dev = jax.device_put(b, parallel.replicated(mesh))
  for start in range(0, len(a), rows):
    part = a[start:start + rows]
    n = len(part)
    # Pad to a multiple of the device count; the last step compiles one extra shape.
    padded = np.zeros((-(-n // mesh.devices.size) * mesh.devices.size, a.shape[1]),
                      np.float32)
    padded[:n] = part
    res = _cosine_block(jax.device_put(padded, parallel.data_sharded(mesh)), b_dev)
    out[start:start + n] = np.asarray(jax.device_get(res))[:n]
  return out


def write_reference_npz(folder: str, real_ids: Sequence[str], synth_ids: Sequence[str],
                        matrix: np.ndarray, name: str = "deepssim") -> dict[str, str]:
  """Writes a score matrix in the reference's format, atomically, so that its
  scripts/eval.py reads our output as its own.

  Files (each np.savez with one key `data`): `<name>.npz` the (n_real, n_synth) float16
  matrix (rows real/training images, columns synthetic, as the reference's
  scripts/compute_matrix.py and eval.py index it: matrix[real_pos, synth_pos]);
  `real.npz` and `synth.npz` the ids in row/column order, in the reference's spelling
  `<uid>___<name>` (fileio.reference_key; eval.py finds test_set.csv's keys by plain equality).
  read_reference_matrix reads them back in our spelling.

  Returns:
    {"matrix": path, "real": path, "synth": path}.

  Raises:
    ValueError: the matrix shape does not match the ids, or two ids have one reference
      spelling (eval.py would find only the first).
  """
  real_ids = np.asarray([fileio.reference_key(k) for k in np.asarray(real_ids).tolist()], str)
  synth_ids = np.asarray([fileio.reference_key(k) for k in np.asarray(synth_ids).tolist()], str)
  matrix = np.asarray(matrix)
  if matrix.shape != (len(real_ids), len(synth_ids)):
    raise ValueError(f"{folder}: matrix shape {matrix.shape} != (real {len(real_ids)}, "
                     f"synthetic {len(synth_ids)})")
  for what, ids in (("real", real_ids), ("synthetic", synth_ids)):
    u, c = np.unique(ids, return_counts=True)
    if (c > 1).any():
      raise ValueError(f"{folder}: {what} id {str(u[c > 1][0])!r} occurs {c[c > 1][0]} times")
  paths = {"matrix": os.path.join(folder, name + ".npz"),
           "real": os.path.join(folder, "real.npz"),
           "synth": os.path.join(folder, "synth.npz")}
  fileio.write_npz(paths["matrix"], data=matrix.astype(np.float16))
  fileio.write_npz(paths["real"], data=real_ids)
  fileio.write_npz(paths["synth"], data=synth_ids)
  return paths


def _npz_data(path: str) -> np.ndarray:
  """The `data` array of an np.savez file; InputError naming the file otherwise."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: file not found")
  try:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise fileio.InputError(f"{path}: a single array, not an .npz archive (np.savez)")
    with z:
      if "data" not in z.files:
        raise fileio.InputError(f"{path}: no 'data' array (found {z.files})")
      return z["data"]
  except fileio.InputError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not npz, pickles, ...
    raise fileio.InputError(f"{path}: cannot read the 'data' array: {e}") from None


def _reference_ids(path: str, what: str) -> np.ndarray:
  """An index file's ids in our spelling, checked: 1-D strings naming distinct images."""
  ids = _npz_data(path)
  if ids.ndim != 1 or ids.dtype.kind not in "US":
    raise fileio.InputError(f"{path}: {what} ids must be a 1-D array of strings, got "
                        f"{ids.dtype} of shape {ids.shape}")
  ids = ids.astype(str)
  canonical = np.asarray([fileio.canonical_key(k) for k in ids.tolist()], str)
  u, first, c = np.unique(canonical, return_index=True, return_counts=True)
  if (c > 1).any():
    raise fileio.InputError(f"{path}: {what} id {str(ids[first[c > 1][0]])!r} occurs "
                        f"{c[c > 1][0]} times (ids must be unique)")
  return canonical


def read_reference_matrix(matrix_path: str, real_path: str, synth_path: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a score matrix and its two index files, the three paths the reference's
  scripts/eval.py takes (--matrix_path, --real_indices_path, --synth_indices_path): ours
  (write_reference_npz) or the reference's own (scripts/compute_matrix.py).

  Returns:
    real_ids (n_real,) and synth_ids (n_synth,) in our spelling `<uid>/<name>`
    (fileio.canonical_key), matrix (n_real, n_synth) as stored (float16 from either writer).

  Raises:
    InputError: naming the file: missing or unreadable, no `data` array, ids not 1-D
      strings or repeated, a matrix that is not 2-D or whose shape is not (n_real, n_synth).
  """
  real_ids = _reference_ids(real_path, "real")
  synth_ids = _reference_ids(synth_path, "synthetic")
  matrix = _npz_data(matrix_path)
  if matrix.shape != (len(real_ids), len(synth_ids)):
    raise fileio.InputError(f"{matrix_path}: shape {matrix.shape} != (real {len(real_ids)} ids "
                        f"in {real_path}, synthetic {len(synth_ids)} ids in {synth_path})")
  if not np.issubdtype(matrix.dtype, np.number):
    raise fileio.InputError(f"{matrix_path}: scores must be numbers, got {matrix.dtype}")
  return real_ids, synth_ids, matrix


def read_reference_npz(folder: str,
                       name: str = "deepssim") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads `<folder>/<name>.npz`, `real.npz` and `synth.npz` (write_reference_npz's layout;
  see read_reference_matrix)."""
  return read_reference_matrix(os.path.join(folder, name + ".npz"),
                               os.path.join(folder, "real.npz"),
                               os.path.join(folder, "synth.npz"))


def matrix_scores(real_ids: Sequence[str], synth_ids: Sequence[str], matrix: np.ndarray,
                  real_keys: Sequence[str], synth_keys: Sequence[str],
                  real_name: str = "real ids", synth_name: str = "synthetic ids"
                  ) -> np.ndarray:
  """matrix[real_pos, synth_pos] of labelled (real_key, synth_key) pairs, in float64: what
  the reference's eval.py scores, with keys in either spelling.

  Raises:
    InputError: a key is not among the ids; the message names the key and `real_name` or
      `synth_name` (the files involved).
  """
  if len(real_keys) != len(synth_keys):
    raise ValueError(f"{len(real_keys)} real keys but {len(synth_keys)} synthetic keys")
  ri = fileio.key_rows(real_ids, real_keys, real_name)
  si = fileio.key_rows(synth_ids, synth_keys, synth_name)
  return np.asarray(matrix)[ri, si].astype(np.float64)


def lookup(ids: Sequence[str], emb: np.ndarray, keys: Sequence[str], name: str) -> np.ndarray:
  """Rows of `emb` for `keys` (ids[i] labels emb[i]).

  Raises:
    InputError: a key is not among the ids; the message names the key and `name` (the store
      folder or file it came from).
  """
  return np.asarray(emb)[fileio.key_rows(ids, keys, name)]


def pair_scores(real_ids, real_emb, synth_ids, synth_emb, real_keys, synth_keys,
                real_name: str = "real store", synth_name: str = "synthetic store",
                normalize_rows: bool = True) -> np.ndarray:
  """Cosine similarity of labelled (real_key, synth_key) pairs, in float32.

  Returns:
    (n_pairs,) scores.
  """
  if len(real_keys) != len(synth_keys):
    raise ValueError(f"{len(real_keys)} real keys but {len(synth_keys)} synthetic keys")
  a = match.normalize(lookup(real_ids, real_emb, real_keys, real_name), real_name,
                      normalize_rows)
  b = match.normalize(lookup(synth_ids, synth_emb, synth_keys, synth_name), synth_name,
                normalize_rows)
  return np.einsum("ij,ij->i", a, b, dtype=np.float64).astype(np.float32)
