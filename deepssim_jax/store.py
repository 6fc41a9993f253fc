"""Embedding stores: sharded, resumable, streamable files of (id, embedding) rows.

Embedding 10^5-10^6 images takes hours, so the embedder writes its output one shard at a
time and a restarted job skips the shards already on disk; matching then streams the
store block by block, so memory stays bounded by the block size and never by the store.

Layout of a store folder:
  shard-00000.npz, shard-00001.npz, ...   each with `ids` (unicode strings, (n,)) and
                                          `emb` (float32 or float16, (n, d))
  index.json                              {"format", "status": "complete" | "partial",
                                           "dim", "dtype", "n_rows",
                                           "shards": [{"file", "rows"}], "meta": {...}}
Rows are ordered by shard index, then by position within the shard. Every file is written
atomically (deepssim_jax.io), so a shard that exists is whole; `completed_shards` tells a
resuming writer which ones to skip. `finalize` checks the shards (contiguous numbering,
one dimension and dtype, unique ids) before it marks the store complete; readers refuse a
store that is not complete or whose shards disagree with its index.

What a store was made from (its identity, `index["meta"]["identity"]`, written by
deepssim_jax.embed.embed_to_store): the number of source images (`n_source`) and a
fingerprint of their ids in order (`source_ids`), the layout (`shard_rows`), the storage
`dtype`, and the caller's inputs (checkpoint fingerprint, data root, image size) with the
combined `fingerprint`. A writer continues a store only when all of it matches
(`prepare_writer`): a partial store whose layout alone changed is rebuilt, any other
difference is refused with the fields that changed. A store is complete only when its rows
are its source: `n_rows == n_source`, and (`finalize`, `load_store` with `source_ids`) the
same ids in the same order. Readers (`read_index`, `load_store`, `iter_store_blocks`)
refuse a store marked complete whose row count differs from its source, naming the folder
and both counts.

Fingerprints hash inputs and settings, never float outputs: embeddings differ in the last
bits (~1e-7) with the batch size, the device count or the XLA version, so a hash of them
would tell two runs of the same images and checkpoint apart while they hold the same
answer. `meta["fingerprint"]` is therefore computed from the checkpoint fingerprint (itself
a hash of the weights, the inputs of the embedder), the data root, the ids in order, the
image size and the dtype; the layout (`shard_rows`) is part of the identity but not of the
fingerprint, since it does not change a row. `fingerprint(folder)` returns it.

It is longer than ~400 lines because it is one file format: the writer and the readers
check the same index, identity and shard invariants, and split apart each would restate them.
"""

import json
import os
import re
import zipfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from deepssim_jax import fileio

INDEX = "index.json"
FORMAT = "deepssim-embedding-store/1"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")
_DTYPES = ("float32", "float16")
# Identity fields that only change how rows are cut into shards, not any row: a partial
# store that differs from its writer only in these is rebuilt rather than refused.
LAYOUT_FIELDS = ("shard_rows",)


def shard_name(shard_idx: int) -> str:
  return f"shard-{shard_idx:05d}.npz"


def write_shard(folder: str, shard_idx: int, ids: Sequence[str], emb: np.ndarray) -> str:
  """Writes one shard atomically.

  Args:
    folder: the store folder (created if missing).
    shard_idx: the shard number (>= 0); shards are read in this order.
    ids: n unique, non-empty identifiers.
    emb: (n, d) float32 or float16 embeddings (other float dtypes are cast to float32).

  Returns:
    The path of the written shard.
  """
  path = os.path.join(folder, shard_name(int(shard_idx)))
  if int(shard_idx) < 0:
    raise ValueError(f"{path}: negative shard index {shard_idx}")
  ids = np.asarray(ids, dtype=str)
  emb = np.asarray(emb)
  if emb.ndim != 2 or ids.ndim != 1 or len(ids) != len(emb):
    raise ValueError(f"{path}: need ids (n,) and emb (n, d); got {ids.shape} and {emb.shape}")
  if emb.dtype.name not in _DTYPES:
    if not np.issubdtype(emb.dtype, np.floating):
      raise ValueError(f"{path}: embeddings must be floating point, got {emb.dtype}")
    emb = emb.astype(np.float32)
  if not np.all(np.isfinite(emb)):
    raise ValueError(f"{path}: embeddings contain NaN or infinity")
  if len(ids) and (ids == "").any():
    raise ValueError(f"{path}: empty id at row {int(np.flatnonzero(ids == '')[0])}")
  dup = _first_duplicate(ids)
  if dup is not None:
    raise fileio.InputError(f"{path}: duplicate id {dup!r}")
  fileio.write_npz(path, ids=ids, emb=emb)
  return path


def _first_duplicate(ids: np.ndarray) -> Optional[str]:
  if len(ids) < 2:
    return None
  s = np.sort(ids)
  hit = np.flatnonzero(s[1:] == s[:-1])
  return str(s[hit[0]]) if len(hit) else None


def _shard_files(folder: str) -> dict[int, str]:
  return {int(m.group(1)): os.path.join(folder, name)
          for name in os.listdir(folder) if (m := _SHARD_RE.match(name))}


def _member_header(zf: zipfile.ZipFile, key: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
  """Reads an .npy member's shape and dtype without reading its data."""
  try:
    with zf.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read(f)
  except KeyError:
    raise fileio.InputError(f"{path}: not a store shard (no {key!r} array)") from None
  return shape, dtype


def shard_info(path: str) -> dict[str, Any]:
  """Shape information of one shard, read from the file headers only.

  Returns:
    {"rows": n, "dim": d, "dtype": "float32" | "float16"}.

  Raises:
    InputError: the file is missing, unreadable, or not a valid shard.
  """
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: shard file not found")
  try:
    with zipfile.ZipFile(path) as zf:
      id_shape, id_dtype = _member_header(zf, "ids", path)
      emb_shape, emb_dtype = _member_header(zf, "emb", path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise fileio.InputError(f"{path}: unreadable shard ({e})") from None
  if len(emb_shape) != 2 or len(id_shape) != 1 or id_shape[0] != emb_shape[0]:
    raise fileio.InputError(f"{path}: need ids (n,) and emb (n, d); got {id_shape} and {emb_shape}")
  if id_dtype.kind != "U":
    raise fileio.InputError(f"{path}: ids must be strings, got {id_dtype}")
  if emb_dtype.name not in _DTYPES:
    raise fileio.InputError(f"{path}: emb dtype {emb_dtype} is not one of {_DTYPES}")
  return {"rows": int(emb_shape[0]), "dim": int(emb_shape[1]), "dtype": emb_dtype.name}


def _read_index(folder: str) -> Optional[dict]:
  path = os.path.join(folder, INDEX)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise fileio.InputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise fileio.InputError(f"{path}: not an embedding-store index (format != {FORMAT!r})")
  return index


def completed_shards(folder: str, fingerprint: Optional[str] = None) -> list[int]:
  """The shard numbers already written and valid, for a resuming writer to skip.

  Args:
    folder: the store folder (a missing folder has no shards).
    fingerprint: the model/checkpoint fingerprint of the resuming writer. If the folder's
      index carries a different `meta["fingerprint"]`, its shards were computed by another
      model and must not be mixed in: InputError.

  Returns:
    Sorted shard numbers whose files exist and whose headers are valid (atomic writes mean
    an existing file is complete; an unreadable one is treated as not done).
  """
  if not os.path.isdir(folder):
    return []
  index = _read_index(folder)
  if fingerprint is not None and index is not None:
    old = index.get("meta", {}).get("fingerprint")
    if old is not None and old != fingerprint:
      raise fileio.InputError(
          f"{os.path.join(folder, INDEX)}: store was written with fingerprint {old!r}, not "
          f"{fingerprint!r}; use a new folder or delete this one")
  done = []
  for idx, path in sorted(_shard_files(folder).items()):
    try:
      shard_info(path)
    except fileio.InputError:
      continue
    done.append(idx)
  return done


def ids_fingerprint(ids: Sequence[str]) -> str:
  """A fingerprint of ids in order (and so of their number), whatever the string width of
  the array holding them."""
  ids = np.asarray(ids, dtype=str)
  return fileio.fingerprint(len(ids), "\x00".join(ids.tolist()))


def identity(index: Mapping[str, Any]) -> dict:
  """What a store says it was made from: `meta["identity"]`, or for a store written before
  identities were recorded, the fields its meta has (fingerprint, shard_rows, n_source)."""
  meta = index.get("meta") or {}
  if isinstance(meta.get("identity"), dict):
    return dict(meta["identity"])
  return {k: meta[k] for k in ("fingerprint", "shard_rows", "n_source") if k in meta}


def is_complete(index: Mapping[str, Any]) -> bool:
  """Status "complete" and, where the index records its source's size, as many rows."""
  n_source = identity(index).get("n_source")
  return index.get("status") == "complete" and (n_source is None
                                                or index.get("n_rows") == n_source)


def _describe(index: Mapping[str, Any]) -> str:
  n_source = identity(index).get("n_source")
  rows = f"{index.get('n_rows')} rows" + ("" if n_source is None else
                                          f" of {n_source} source images")
  return f"{'complete' if is_complete(index) else 'partial'}, {rows}"


def _clear(folder: str) -> None:
  """Removes a store's index and shard files (nothing else in the folder)."""
  for path in [os.path.join(folder, INDEX), *_shard_files(folder).values()]:
    if os.path.exists(path):
      os.remove(path)


def prepare_writer(folder: str, ident: Mapping[str, Any], meta: Mapping[str, Any]) -> list[int]:
  """Makes `folder` ready for a writer of the store `ident` describes; the shards done.

  Args:
    folder: the store folder (created if missing).
    ident: what the writer makes the store from (embed.embed_to_store: n_source,
      source_ids, shard_rows, dtype, fingerprint, and the caller's inputs), JSON values.
    meta: the index meta of a new store; it must carry `ident` as meta["identity"].

  Returns:
    Sorted numbers of the valid shards already written (completed_shards).

  Cases:
    * no store (no index, no shards): a new one; a partial index is written at once, so a
      job killed after its first shard leaves a store that says what made it.
    * a store with the same identity (every field both record is equal): continued.
    * a partial store (is_complete: status and row count) that differs only in
      LAYOUT_FIELDS (shard_rows): its shards cut the source elsewhere and cannot be reused;
      its index and shard files are removed and the store begins again.
    * anything else (another checkpoint or data root, other or more or fewer images,
      another dtype or image size, a complete store of another layout, shard files without
      an index): InputError naming the folder and each field that changed, old -> new;
      nothing is touched.
  """
  path = os.path.join(folder, INDEX)
  index = _read_index(folder) if os.path.isdir(folder) else None
  if index is None:
    if os.path.isdir(folder) and _shard_files(folder):
      raise fileio.InputError(f"{folder}: shard files but no {INDEX}; nothing says what made "
                          "them. Use another folder or delete this one")
    os.makedirs(folder, exist_ok=True)
    finalize(folder, meta, complete=False)
    return []
  old = identity(index)
  changed = [k for k in ident if k in old and old[k] != ident[k]]
  if not changed:
    return completed_shards(folder)
  diff = ", ".join(f"{k} {old[k]!r} -> {ident[k]!r}" for k in changed)
  if set(changed) <= set(LAYOUT_FIELDS) and not is_complete(index):
    logging.warning("%s: the store (%s) was begun with another layout (%s): its shards "
                    "cannot be reused; starting it again", folder, _describe(index), diff)
    _clear(folder)
    finalize(folder, meta, complete=False)
    return []
  hint = ("set " + ", ".join(f"embed.{k}={old[k]!r}" for k in changed) + " to use it, "
          if set(changed) <= set(LAYOUT_FIELDS) else "")
  raise fileio.InputError(f"{path}: the store ({_describe(index)}) was made from other inputs or "
                      f"settings than these: {diff}; {hint}use another folder (embed.dir) or "
                      "delete this one")


def finalize(folder: str, meta: Mapping[str, Any], complete: bool = True,
             source_ids: Optional[Sequence[str]] = None) -> dict:
  """Checks the shards and writes index.json.

  Args:
    folder: the store folder.
    meta: free-form metadata recorded in the index; put the model/checkpoint fingerprint
      under "fingerprint" (completed_shards checks it).
    complete: True once every shard is written. False records progress (status
      "partial"): readers refuse the store, resuming writers still see the fingerprint.
    source_ids: (when complete) the ids of the images the store was made from, in order:
      the store's rows must be exactly these. Without them, a row count recorded as
      meta["identity"]["n_source"] must equal the store's.

  Returns:
    The index written (an index.json with the same content is left as it is).

  Raises:
    InputError: missing folder; (when complete) no shards, a gap in the shard numbers,
      dimensions or dtypes that differ across shards, an id present twice, or rows that
      are not the source's (count or ids), naming the folder and both counts.
  """
  if not os.path.isdir(folder):
    raise fileio.InputError(f"{folder}: store folder not found")
  files = _shard_files(folder)
  infos = {i: shard_info(p) for i, p in sorted(files.items())}
  if complete:
    if not infos:
      raise fileio.InputError(f"{folder}: no shard files (shard-00000.npz, ...)")
    missing = sorted(set(range(max(infos) + 1)) - set(infos))
    if missing:
      raise fileio.InputError(f"{folder}: incomplete store, missing shard(s) "
                          f"{[shard_name(i) for i in missing[:5]]}")
  dim = dtype = None
  first = None
  for i, info in infos.items():
    if dim is None:
      dim, dtype, first = info["dim"], info["dtype"], files[i]
    elif info["dim"] != dim:
      raise fileio.InputError(f"{files[i]}: embedding dimension {info['dim']} differs from "
                          f"{dim} in {first}")
    elif info["dtype"] != dtype:
      raise fileio.InputError(f"{files[i]}: dtype {info['dtype']} differs from {dtype} in {first}")
  n_rows = int(sum(v["rows"] for v in infos.values()))
  if complete:
    seen: dict[str, int] = {}
    all_ids = []
    for i in infos:
      with np.load(files[i], allow_pickle=False) as z:
        ids = z["ids"]
      dup = _first_duplicate(ids)
      if dup is not None:
        raise fileio.InputError(f"{files[i]}: duplicate id {dup!r}")
      for key in ids.tolist():
        j = seen.setdefault(key, i)
        if j != i:
          raise fileio.InputError(f"{folder}: duplicate id {key!r} in {shard_name(j)} and "
                              f"{shard_name(i)}")
      all_ids.append(ids)
    n_source = (meta.get("identity") or {}).get("n_source")
    if source_ids is not None:
      check_rows(folder, np.concatenate(all_ids), source_ids)
    elif n_source is not None and n_rows != n_source:
      raise fileio.InputError(f"{folder}: {n_rows} rows but the source has {n_source} images; "
                          "the store is not complete")
  index = {
      "format": FORMAT,
      "status": "complete" if complete else "partial",
      "dim": dim,
      "dtype": dtype,
      "n_rows": n_rows,
      "shards": [{"file": shard_name(i), "rows": v["rows"]} for i, v in infos.items()],
      "meta": dict(meta),
  }
  try:  # as JSON reads it back (tuples become lists)
    same = _read_index(folder) == json.loads(json.dumps(index, default=_plain))
  except fileio.InputError:
    same = False
  if not same:
    fileio.write_json(os.path.join(folder, INDEX), index)
  return index


def _plain(x):
  return x.item() if isinstance(x, np.generic) else np.asarray(x).tolist()


def check_rows(folder: str, ids: np.ndarray, source_ids: Sequence[str]) -> None:
  """InputError unless a store's ids are its source's, same number, same order."""
  source_ids = np.asarray(source_ids, dtype=str)
  if len(ids) != len(source_ids):
    raise fileio.InputError(f"{folder}: the store has {len(ids)} rows but its source has "
                        f"{len(source_ids)} images; it is not a store of this source")
  diff = np.flatnonzero(np.asarray(ids, dtype=str) != source_ids)
  if len(diff):
    r = int(diff[0])
    raise fileio.InputError(f"{folder}: row {r} of the store's {len(ids)} is {str(ids[r])!r}, the "
                        f"source's image {r} (of {len(source_ids)}) is "
                        f"{str(source_ids[r])!r}; it is not a store of this source")


def read_index(folder: str, source_ids: Optional[Sequence[str]] = None) -> dict:
  """The index of a complete store, with its shard files checked against it.

  Args:
    folder: the store folder.
    source_ids: the ids of the image set the caller takes the store for, in order: the
      store must have as many rows, and (where its identity records their fingerprint)
      the same ids. load_store compares the ids themselves.

  Raises:
    InputError: missing folder or index, a partial store, a store marked complete whose
      rows are fewer or more than its source's images (or than `source_ids`), or a shard
      that is missing or disagrees with the index (rows, dimension, dtype). Messages name
      the folder and the counts.
  """
  if not os.path.isdir(folder):
    raise fileio.InputError(f"{folder}: store folder not found")
  index = _read_index(folder)
  path = os.path.join(folder, INDEX)
  if index is None:
    raise fileio.InputError(f"{path}: not found; the store is incomplete (finalize was not run)")
  if index.get("status") != "complete":
    raise fileio.InputError(f"{path}: store status is {index.get('status')!r}, not 'complete' "
                        f"({index.get('n_rows')} rows); run --mode=embed to finish it")
  ident = identity(index)
  n_rows = index.get("n_rows")
  if sum(s["rows"] for s in index["shards"]) != n_rows:
    raise fileio.InputError(f"{path}: n_rows {n_rows} is not the sum of its shards' rows "
                        f"({sum(s['rows'] for s in index['shards'])})")
  if "n_source" in ident and n_rows != ident["n_source"]:
    raise fileio.InputError(f"{folder}: marked complete but has {n_rows} rows for "
                        f"{ident['n_source']} source images; it is incomplete: run "
                        "--mode=embed to finish it, or delete it")
  if source_ids is not None:
    n = len(source_ids)
    if n != n_rows:
      raise fileio.InputError(f"{folder}: the store has {n_rows} rows but its image set now has "
                          f"{n} images; it was made from other images: delete it or use "
                          "another folder (embed.dir)")
    if "source_ids" in ident and ident["source_ids"] != ids_fingerprint(source_ids):
      raise fileio.InputError(f"{folder}: the store's {n_rows} ids are not the {n} ids of its "
                          "image set (other images, or another order); delete it or use "
                          "another folder (embed.dir)")
  for s in index["shards"]:
    info = shard_info(os.path.join(folder, s["file"]))
    if info["rows"] != s["rows"]:
      raise fileio.InputError(f"{os.path.join(folder, s['file'])}: {info['rows']} rows, the "
                          f"index says {s['rows']}")
    if info["dim"] != index["dim"] or info["dtype"] != index["dtype"]:
      raise fileio.InputError(f"{os.path.join(folder, s['file'])}: ({info['dim']}, "
                          f"{info['dtype']}) differs from the index ({index['dim']}, "
                          f"{index['dtype']})")
  return index


def load_store(folder: str, source_ids: Optional[Sequence[str]] = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole store into memory (for small stores; stream big ones).

  Args:
    folder: a complete store (read_index).
    source_ids: if given, the store's ids must be exactly these, in this order.

  Returns:
    ids: (n,) unicode array; emb: (n, d) in the store's dtype.
  """
  index = read_index(folder, source_ids)
  ids, embs = [], []
  for s in index["shards"]:
    with np.load(os.path.join(folder, s["file"]), allow_pickle=False) as z:
      ids.append(z["ids"])
      embs.append(z["emb"])
  ids = np.concatenate(ids) if ids else np.zeros((0,), str)
  emb = (np.concatenate(embs) if embs else np.zeros((0, index["dim"] or 0), index["dtype"]))
  dup = _first_duplicate(ids)
  if dup is not None:
    raise fileio.InputError(f"{folder}: duplicate id {dup!r}")
  if source_ids is not None:
    check_rows(folder, ids, source_ids)
  return ids, emb


def fingerprint(folder: str) -> str:
  """The fingerprint a complete store records (meta["fingerprint"]): a hash of what it was
  made from (checkpoint, data, ids, image size, dtype), not of its float rows, so the same
  images embedded with another batch size, device count or shard layout give the same one
  (see the module docstring)."""
  return str(read_index(folder).get("meta", {}).get("fingerprint", ""))


def iter_store_blocks(folder: str, block_rows: int,
                      index: Optional[dict] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams a store as consecutive blocks of `block_rows` rows (the last may be shorter).

  Memory is bounded by one shard plus one block. Blocks cross shard boundaries, so the
  block size is independent of how the store was sharded.

  Args:
    folder: a complete store.
    block_rows: rows per block (> 0).
    index: the store's index if already read (read_index), to skip re-checking.

  Yields:
    (ids (m,), emb (m, d)) in the store's dtype, m == block_rows except for the last.
  """
  if block_rows <= 0:
    raise ValueError(f"block_rows must be positive, got {block_rows}")
  index = read_index(folder) if index is None else index
  pend_ids: list[np.ndarray] = []
  pend_emb: list[np.ndarray] = []
  pending = 0
  for s in index["shards"]:
    with np.load(os.path.join(folder, s["file"]), allow_pickle=False) as z:
      ids, emb = z["ids"], z["emb"]
    start = 0
    while start < len(ids):
      take = min(block_rows - pending, len(ids) - start)
      pend_ids.append(ids[start:start + take])
      pend_emb.append(emb[start:start + take])
      pending += take
      start += take
      if pending == block_rows:
        yield _join(pend_ids, pend_emb)
        pend_ids, pend_emb, pending = [], [], 0
    del ids, emb
  if pending:
    yield _join(pend_ids, pend_emb)


def _join(ids, emb):
  if len(ids) == 1:
    return ids[0], emb[0]
  return np.concatenate(ids), np.concatenate(emb)
