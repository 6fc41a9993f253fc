"""`python -m deepssim_jax.data --out=DIR`: the embedded demo as two PNG folders.

Writes DIR/training/*.png (96 real slices of four heads), DIR/synthetic/*.png (192 images:
augmented copies, neighbouring slices, another head) and DIR/truth.csv (which synthetic
images are copies, and of what), the input of
`python -m deepssim_jax.score --train=DIR/training --synth=DIR/synthetic --truth=DIR/truth.csv`.
The sizes are configs/demo.py's.
"""

from absl import app, flags

from deepssim_jax import cli
from deepssim_jax.data import demo

_OUT = flags.DEFINE_string("out", "demo_pngs", "Folder to write (absent or empty).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")

  def body():
    r = demo.write_demo_folders(_OUT.value, slices_per_head=24, num_copies=96,
                                num_neighbours=64, num_other=32, heldout_per_head=0)
    print(f"wrote {r['num_training']} training and {r['num_synthetic']} synthetic PNGs to "
          f"{_OUT.value}/training and {_OUT.value}/synthetic, known answers in {r['truth']}")

  cli.run_guarded(body)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
