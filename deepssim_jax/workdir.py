"""One job per workdir: a lock file, and the temporaries of killed jobs cleaned at start.

Every writing mode of both entrypoints (deepssim_jax.main, ldm_jax.main) runs inside
`locked(workdir, mode)`:

  * `<workdir>/.lock` is created atomically (O_CREAT | O_EXCL) and holds the owner's PID,
    host, start time, mode and a random token; it is removed when the job ends, also on an
    exception. A second job on the same workdir stops at once with
    "DIR is in use by PID N on HOST since T (mode M); ..." (WorkdirInUse) and writes nothing.
  * A lock whose owner is gone (same host, the PID no longer alive, or alive but a newer
    process that reused the PID) is stale: it is logged and taken over. A lock of another
    host cannot be checked and is never taken over; the message says how to remove it.
  * Once the lock is held, temporaries left by killed jobs are removed and logged
    (clean_temporaries): hidden `.<name>.XXXXXXXX[.old]` folders of audit.publish, orbax
    `*.orbax-checkpoint-tmp*` folders and `.<name>.XXXXXXXX.tmp` files of fileio.atomic_open.
    A running job's temporaries are never touched: its lock stops the second job first.

Multi-process runs (jax.distributed; all processes share the workdir): only process 0
takes the lock and cleans, then tells every process the outcome (one broadcast), so a
refused multi-process job stops on every process with the same message, and the other
processes write nothing before the cleaning is done. One lock per job (not one per process)
because the processes of a job share the workdir by design: the lock keeps out *other*
jobs, and one lock file names the one job that holds it; PIDs of the other hosts could not
be checked for staleness anyway.
"""

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import socket
import time
from typing import Iterator, Optional

from absl import logging

LOCK_NAME = ".lock"
_TAKEOVER_SUFFIX = "-takeover"
_TAKEOVER_MAX_AGE_S = 60.0  # a takeover guard older than this was left by a killed process

# tempfile's random names: 8 characters of this alphabet (tempfile._RandomNameSequence).
_RAND = r"[a-z0-9_]{8}"
ATOMIC_TMP = re.compile(rf"^\..+\.{_RAND}\.tmp$")          # fileio.atomic_open
PUBLISH_TMP = re.compile(rf"^\..+\.{_RAND}(\.old)?$")      # audit.publish (folders)
ORBAX_TMP = ".orbax-checkpoint-tmp"                        # orbax: <name>.orbax-checkpoint-tmp*


class WorkdirInUse(RuntimeError):
  """Another job holds the workdir's lock."""


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _proc_start(pid: int) -> Optional[str]:
  """The start time of process `pid` in clock ticks since boot (Linux /proc), else None.
  With the PID it identifies a process: a PID reused by a newer process has another."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat.rpartition(")")[2].split()
  return fields[19] if len(fields) > 19 else None  # field 22 of proc(5); 3 is fields[0]


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True


def read_lock(path: str) -> Optional[dict]:
  """The lock file's content, None if absent; {} if unreadable (being written, damaged)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    info = json.loads(text)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def stale_reason(info: dict) -> Optional[str]:
  """Why a lock's owner is certainly gone (same host only), else None."""
  if not info or info.get("host") != socket.gethostname():
    return None
  try:
    pid = int(info.get("pid"))
  except (TypeError, ValueError):
    return None
  if not _pid_alive(pid):
    return f"PID {pid} is no longer running"
  recorded, current = info.get("proc_start"), _proc_start(pid)
  if recorded and current and recorded != current:
    return f"PID {pid} now belongs to another process"
  return None


def describe(workdir: str, info: dict) -> str:
  """'DIR is in use by PID N on HOST since T (mode M); <what to do>'."""
  path = os.path.join(workdir, LOCK_NAME)
  if not info:
    return (f"{workdir} is in use: its lock file {path} exists but cannot be read; if no job "
            "runs on this workdir, remove it")
  here = info.get("host") == socket.gethostname()
  todo = ("wait for that job to end or stop it" if here else
          "wait for that job to end; if it no longer runs (its host cannot be checked from "
          f"here), remove {path}")
  return (f"{workdir} is in use by PID {info.get('pid')} on {info.get('host')} since "
          f"{info.get('started')} (mode {info.get('mode')}); {todo}, or use another --workdir")


class WorkdirLock:
  """`<workdir>/.lock`, held by this process between acquire() and release()."""

  def __init__(self, workdir: str, mode: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.mode = mode
    self.info: Optional[dict] = None  # our lock's content while held
    self.took_over: Optional[dict] = None  # the stale lock replaced, if any

  @property
  def held(self) -> bool:
    return self.info is not None

  def acquire(self, wait_s: float = 5.0) -> "WorkdirLock":
    """Creates the lock, taking over a stale one.

    Raises:
      WorkdirInUse: another job holds it.
      OSError: the workdir cannot be created or written (read-only, not a folder, ...).
    """
    os.makedirs(self.workdir, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
            "mode": self.mode, "token": secrets.token_hex(8),
            "proc_start": _proc_start(os.getpid())}
    deadline = time.monotonic() + wait_s
    while True:
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        other = read_lock(self.path)
        if other is None:
          continue  # released meanwhile: try again
        if other == {} and time.monotonic() < deadline:
          time.sleep(0.1)  # being written by its owner (created, not yet filled)
          continue
        reason = stale_reason(other)
        if reason is None:
          raise WorkdirInUse(describe(self.workdir, other)) from None
        if self._remove_stale(other, reason):
          self.took_over = other
        elif time.monotonic() >= deadline:
          raise WorkdirInUse(describe(self.workdir, other)) from None
        else:
          time.sleep(0.1)  # another process is taking it over: see who wins
        continue
      try:
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
      except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
          os.remove(self.path)
        raise
      os.close(fd)
      self.info = info
      return self

  def _remove_stale(self, stale: dict, reason: str) -> bool:
    """Removes the stale lock `stale` if it is still the current one; True if removed.

    Two jobs may find the same stale lock: a guard file created with O_EXCL lets one of
    them at a time check and remove it, so none removes a lock the other has just taken.
    """
    guard = self.path + _TAKEOVER_SUFFIX
    try:
      gfd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      with contextlib.suppress(OSError):
        if time.time() - os.path.getmtime(guard) > _TAKEOVER_MAX_AGE_S:
          os.remove(guard)  # left by a process killed while taking over
      return False
    try:
      if read_lock(self.path) != stale:
        return False
      os.remove(self.path)
    finally:
      os.close(gfd)
      with contextlib.suppress(FileNotFoundError):
        os.remove(guard)
    logging.warning("%s: took over a stale lock (%s): PID %s on %s since %s (mode %s)",
                    self.workdir, reason, stale.get("pid"), stale.get("host"),
                    stale.get("started"), stale.get("mode"))
    return True

  def release(self) -> None:
    """Removes the lock if it is still ours."""
    if self.info is None:
      return
    try:
      if read_lock(self.path) == self.info:
        os.remove(self.path)
      else:
        logging.warning("%s: the lock is no longer this job's; left as it is", self.path)
    except OSError as e:
      logging.warning("%s: could not remove the lock: %s", self.path, e)
    self.info = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def temporaries(workdir: str) -> list[str]:
  """Temporaries of interrupted jobs under `workdir` (see the module docstring); links are
  neither followed nor listed."""
  found = []
  for root, dirs, files in os.walk(workdir):
    keep = []
    for d in dirs:
      p = os.path.join(root, d)
      if os.path.islink(p):
        continue
      if ORBAX_TMP in d or PUBLISH_TMP.match(d):
        found.append(p)
      else:
        keep.append(d)
    dirs[:] = keep
    found += [os.path.join(root, f) for f in files
              if ATOMIC_TMP.match(f) and not os.path.islink(os.path.join(root, f))]
  return sorted(found)


def clean_temporaries(workdir: str) -> list[str]:
  """Removes temporaries(workdir), logging each (one that cannot be removed is logged and
  left); call only while holding the lock. Returns the paths removed."""
  removed = []
  for p in temporaries(workdir):
    try:
      if os.path.isdir(p):
        shutil.rmtree(p)
      else:
        os.remove(p)
    except FileNotFoundError:
      continue
    except OSError as e:  # best effort: the job itself decides whether it can run
      logging.warning("Could not remove %s, left by an interrupted job: %s", p, e)
      continue
    removed.append(p)
    logging.warning("Removed %s, left by an interrupted job", p)
  return removed


def _broadcast_text(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process (a collective: all processes call it)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  buf = np.zeros(size, np.uint8)
  data = text.encode()[:size]
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out[out != 0].astype(np.uint8)).decode(errors="replace")


@contextlib.contextmanager
def locked(workdir: str, mode: str, clean: bool = True) -> Iterator[Optional[WorkdirLock]]:
  """Runs the body holding the workdir's lock (process 0 of a multi-process run), after
  removing the temporaries of interrupted jobs; yields the lock (None on other processes).

  Raises:
    WorkdirInUse: another job holds the workdir; on processes other than 0, also when
      process 0 failed otherwise (its message is passed on).
    OSError: the workdir cannot be created or written (process 0).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from deepssim_jax import parallel  # pylint: disable=g-import-not-at-top
  lock, err = None, None
  if parallel.is_main_process():
    lock = WorkdirLock(workdir, mode)
    try:
      lock.acquire()
      if clean:
        clean_temporaries(workdir)
    except Exception as e:  # pylint: disable=broad-except
      lock.release()
      err = e
  if jax.process_count() > 1:
    msg = _broadcast_text("" if err is None else str(err) or type(err).__name__)
    if err is None and msg:
      raise WorkdirInUse(f"process 0 could not take {workdir}: {msg}")
  if err is not None:
    raise err
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()

