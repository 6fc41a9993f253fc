"""`python -m deepssim_jax.pretrained --workdir=W [--workdir=W2 ...] [--checkpoint=best]
[--out=FILE]`."""

from absl import app, flags

from deepssim_jax import cli
from deepssim_jax import pretrained

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Training workdir to export; give it "
                                      "several times to join the runs into one ensemble "
                                      "(the mean of their cosines).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best | latest | best:<step> | "
                                  "latest:<step>.")
_OUT = flags.DEFINE_string("out", pretrained.BUILTIN, "Model file to write (.npz).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  which, _, step = _CHECKPOINT.value.partition(":")

  def body():
    meta = pretrained.export(_WORKDIR.value, which, _OUT.value, int(step) if step else None)
    what = f"{len(meta['members'])} networks" if "members" in meta else f"step {meta['step']}"
    print(f"wrote {_OUT.value}: {what}, weights sha256 {meta['weights_sha256'][:16]}...")

  cli.run_guarded(body, verbose=cli.verbose_requested(cli.VERBOSE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
