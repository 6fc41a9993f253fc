"""What the entrypoints (deepssim_jax.main, ldm_jax.main) share: one-line errors for users.

Errors meant for users end a run with `error: <message>` (and, where useful, one
`hint: ...` line) on stderr and exit status 2, without a traceback:
  * fileio.InputError (bad input files; validate.ConfigError, bad config values, is one),
  * workdir.WorkdirInUse (another job holds the workdir),
  * OSErrors a user fixes: permissions, a read-only or full disk, a missing path, a path
    under a regular file (errno in USER_ERRNOS),
  * SystemExit(<message>) (e.g. fileio.require_path: data to download),
  * bad flags, and overrides of config fields that do not exist (configs are locked).
Any other exception is a bug: it keeps its traceback (exit status 1). `--verbose` or
DEEPSSIM_VERBOSE=1 prints the traceback of user errors too.
"""

import errno
import os
import sys
import traceback
import types
from typing import Callable, Optional, Sequence, TypeVar

from absl import flags
from ml_collections import config_flags

from deepssim_jax import fileio, parallel, validate, workdir as workdir_lib

EXIT_USER_ERROR = 2
VERBOSE_ENV = "DEEPSSIM_VERBOSE"
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                         errno.EISDIR, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                         errno.ELOOP})

T = TypeVar("T")

# Every entrypoint's --verbose. Defined here, once: absl refuses a flag defined by two
# modules, and a test process (or a notebook) may import several entrypoints.
VERBOSE = flags.DEFINE_bool("verbose", False, "Tracebacks for errors meant for users too "
                            f"(or {VERBOSE_ENV}=1).")
_RUN_FLAGS: list = []


def run_flags() -> types.SimpleNamespace:
  """The flags deepssim_jax.main and ldm_jax.main share, defined on the first call (both
  modules can then be imported in one process): config, workdir, mode (each entrypoint
  checks it against its own modes) and the jax.distributed settings."""
  if not _RUN_FLAGS:
    _RUN_FLAGS.append(types.SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, "Config file.",
                                               lock_config=True),
        workdir=flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go "
                                    "(default: config.workdir)."),
        mode=flags.DEFINE_string("mode", None, "Job to run (deepssim_jax.main: default "
                                 "train; ldm_jax.main: default config.mode); a wrong name "
                                 "lists the choices."),
        coordinator=flags.DEFINE_string("coordinator_address", None, "jax.distributed "
                                        "coordinator host:port (multi-process runs; "
                                        "auto-detected on SLURM/TPU)."),
        num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes "
                                           "(multi-process)."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index "
                                        "(multi-process).")))
  return _RUN_FLAGS[0]


def start_run(example_config: str):
  """What a training entry point does first: jax.distributed (multi-process settings from
  run_flags(), or auto-detected), logging, and the config (required). Returns the config.

  Raises:
    validate.ConfigError: incomplete multi-process settings, or no --config.
  """
  f = run_flags()
  try:
    parallel.initialize_distributed(f.coordinator.value, f.num_processes.value,
                                    f.process_id.value)
  except ValueError as e:  # incomplete multi-process settings
    raise validate.ConfigError(str(e)) from e
  parallel.setup_logging()
  if f.config.value is None:
    raise validate.ConfigError(f"--config is required, e.g. --config={example_config}")
  return f.config.value


def verbose_requested(flag_value: bool = False, argv: Optional[Sequence[str]] = None) -> bool:
  """--verbose (the flag's value, or in argv before flags are parsed) or DEEPSSIM_VERBOSE."""
  env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
  in_argv = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv or ())
  return bool(flag_value) or env or in_argv


def _os_hint(exc: OSError) -> Optional[str]:
  if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return ("outputs go to the workdir: choose a writable --workdir or fix the folder's "
            "permissions")
  if exc.errno == errno.ENOTDIR:
    return "a part of this path is a file, not a folder: choose another path"
  if exc.errno in (errno.ENOSPC, errno.EDQUOT):
    return "free some space or choose a --workdir on another disk"
  return None


def user_error(exc: BaseException) -> Optional[tuple[str, Optional[str]]]:
  """(message, hint or None) of an error meant for the user, else None (a bug)."""
  if isinstance(exc, SystemExit):
    return (exc.code, None) if isinstance(exc.code, str) and exc.code else None
  if isinstance(exc, (fileio.InputError, workdir_lib.WorkdirInUse)):
    return str(exc), getattr(exc, "hint", None)  # validate.ConfigError has one
  if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
    what = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
      where = f"{exc.filename} -> {exc.filename2}: "
    return f"{where}{what[:1].lower()}{what[1:]}", _os_hint(exc)
  return None


def report(message: str, hint: Optional[str] = None) -> None:
  """Prints `error: <message>` (and `hint: <hint>`) to stderr."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr)
  if hint:
    print(f"hint: {hint}", file=sys.stderr)
  sys.stderr.flush()


def run_guarded(body: Callable[[], T], verbose: bool = False) -> T:
  """body(); a user error (user_error) is reported in one line and ends the process with
  SystemExit(2); with `verbose` its traceback comes first. Other exceptions propagate."""
  try:
    return body()
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    found = user_error(e)
    if found is None:
      raise
    if verbose:
      traceback.print_exc()
    report(*found)
    raise SystemExit(EXIT_USER_ERROR) from None


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl's parsing, with flag errors and overrides of config
  fields that do not exist (the configs are locked) reported in one line, exit status 2."""
  verbose = verbose_requested(argv=argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if verbose:
      traceback.print_exc()
    report(str(e).splitlines()[0] if str(e) else type(e).__name__,
           "see --helpshort; config fields are overridden as --config.<section>.<key>=<value>")
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown field of a locked config
    if verbose:
      traceback.print_exc()
    name, suggestion = _unknown_field(e)
    args = [a for a in argv[1:] if a.startswith("--config.")]
    culprit = next((a for a in args
                    if name in a.split("=")[0].removeprefix("--config.").split(".")),
                   ", ".join(args) or "a --config.<key> override")
    report(f"{culprit}: the config has no field {name!r}" + (f"; {suggestion}" if suggestion
                                                             else ""),
           "configs are locked: only fields the config file defines can be set")
  raise SystemExit(EXIT_USER_ERROR)


def _unknown_field(exc: BaseException) -> tuple[str, str]:
  """(field name, 'did you mean ...?' or '') from ml_collections' KeyError/AttributeError."""
  while exc.args and isinstance(exc.args[0], BaseException):
    exc = exc.args[0]
  text = str(exc.args[0]) if exc.args else str(exc)
  first, _, rest = text.partition("\n")
  name = first.strip().strip("\"'")
  rest = rest.strip()
  return name, (rest[:1].lower() + rest[1:]) if rest else ""
