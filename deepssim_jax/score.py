"""Score images with a DeepSSIM model, no config file or workdir needed.

Two images (PNG files, or NIfTI volumes of one axial slice each):

    python -m deepssim_jax.score a.png b.png [--model=builtin]

prints their DeepSSIM and its class under the paper's thresholds (`--align`: after the second
image is rigidly registered onto the first, deepssim_jax.align; with folders, each training
image onto the synthetic one, for the paper's classes and Dar et al.'s threshold; by
default as the model says, config.model.align: the built-in model aligns). Two
folders (PNG files or NIfTI volumes, read recursively):

    python -m deepssim_jax.score --train=DIR --synth=DIR [--k=5] [--out=DIR] [--model=SPEC]

embeds both sets (with a progress bar), finds each synthetic image's k nearest training
images and writes DIR (default ./score_out) as the memorization audit does, all or nothing:
audit.csv (per synthetic image: its k nearest training ids, their scores, the class of the
nearest), summary.json and report.html (offline: histogram, gallery of the closest pairs
with their explanation maps, deepssim_jax.explain).
`--heldout=DIR` (real images the model never saw) adds Dar et al.'s calibrated threshold;
`--truth=CSV` (synth_id, memorized[, source_id]) scores each decision rule against known
answers in the summary and the report.
`--model` takes any spec of deepssim_jax.load (default: the built-in model).
"""

import os
from typing import Optional, Sequence

import numpy as np
from absl import app, flags, logging

from deepssim_jax import api, audit, cli, config_lib, fileio, truth as truth_lib

def score_pair(model: api.Model, a: str, b: str, align: Optional[bool] = None) -> dict:
  """{"score", "class"} of two single images (align: Model.score's)."""
  s = model.score(a, b, align=align)
  return {"score": s, "class": api.classify(s)}


def audit_config(k: int, out_dir: str, heldout: bool, align: bool = False):
  """The base config's audit sections for a folder audit (no known answers by default;
  align: audit.align)."""
  c = config_lib.base_config()
  c.audit.k = k
  c.audit.align = align
  c.audit.out_dir = out_dir
  c.audit.truth = ""
  c.calibrate.dar.enabled = heldout
  return c


def score_folders(model: api.Model, train: str, synth: str, out_dir: str, k: int = 5,
                  heldout: Optional[str] = None, truth: Optional[str] = None,
                  chunk: int = 2048, num_threads: int = 4, align: Optional[bool] = None
                  ) -> dict:
  """Audits the synthetic folder against the training folder with `model` and publishes
  audit.csv, summary.json and report.html into out_dir (deepssim_jax.audit; align: scores
  after rigid registration, audit.align; None: the model's own Model.align). Returns
  {"out_dir", "summary"}."""
  align = model.align if align is None else align
  config = audit_config(k, out_dir, heldout is not None, align)
  sets = {}
  for role, path in (("training", train), ("synthetic", synth), ("heldout", heldout)):
    if path is None:
      continue
    src = model.source(path)
    ids = np.asarray(src.keys, dtype=str)
    emb = api.embed_source(model, src, role, chunk, num_threads)
    sets[role] = {"name": role, "ids": ids, "emb": emb, "source": src,
                  "rows": np.arange(len(ids)), "shape": model.image_size,
                  "fingerprint": fileio.fingerprint(os.path.abspath(path), ids,
                                                str(model.image_size)),
                  "emb_fingerprint": fileio.fingerprint(model.fingerprint, os.path.abspath(path),
                                                    ids)}
  known = truth_lib.read_truth(truth, sets["synthetic"]["ids"]) if truth else None
  explainer = audit.make_explainer(config, "", lambda c, w: (model.model, model.variables))
  out = audit.compute_audit(config, sets, model.fingerprint, known, explainer=explainer,
                            embed_images=model.embed_read if align else None)
  out_dir = audit.publish(out_dir, out["files"])
  return {"out_dir": out_dir, "summary": out["summary"]}


def run(images: Sequence[str], *, model: str = "builtin", train: Optional[str] = None,
        synth: Optional[str] = None, heldout: Optional[str] = None,
        truth: Optional[str] = None, k: int = 5, out: str = "score_out",
        batch_size: int = 64, chunk: int = 2048, num_threads: int = 4,
        align: Optional[bool] = None) -> dict:
  """The command: two images (score_pair) or two folders (score_folders); prints the result.

  Raises:
    fileio.InputError: arguments that do not fit together, and every input error below.
  """
  folders = train or synth
  if folders and images:
    raise fileio.InputError("give either two images (A B) or --train and --synth, not both")
  if not folders and len(images) != 2:
    raise fileio.InputError("expected two images (python -m deepssim_jax.score A B) or "
                        "--train=DIR --synth=DIR")
  if folders and not (train and synth):
    raise fileio.InputError("--train and --synth go together")
  if k < 1:
    raise fileio.InputError(f"--k must be >= 1, got {k}")
  m = api.load(model, batch_size=batch_size)
  if not folders:
    r = score_pair(m, *images, align=align)
    print(f"{r['score']:.4f}\t{r['class']}")
    return r
  r = score_folders(m, train, synth, out, k, heldout, truth, chunk, num_threads, align)
  s = r["summary"]
  print(f"{s['n_synthetic']} synthetic images against {s['n_training']} training images: "
        f"{100 * s['memorization_rate']:.1f}% Duplicate "
        f"(score > {s['thresholds']['t_high']:g}); wrote {r['out_dir']}/audit.csv, "
        f"summary.json, report.html")
  return r


def _define_flags() -> None:
  # Only when run as a script: the module is also imported (tests, notebooks) next to other
  # entrypoints, and absl refuses a flag defined twice. --verbose is cli.VERBOSE.
  flags.DEFINE_string("model", "builtin", "Model spec: builtin, <workdir>:best, "
                      "<workdir>:latest[:<step>], a converted folder or a .npz.")
  flags.DEFINE_string("train", None, "Folder (or file) of training images.")
  flags.DEFINE_string("synth", None, "Folder (or file) of synthetic images.")
  flags.DEFINE_string("heldout", None, "Optional folder of held-out real images "
                      "(Dar et al.'s threshold).")
  flags.DEFINE_string("truth", None, "Optional known answers: a CSV synth_id, memorized "
                      "(0/1)[, source_id] (the report then scores each decision rule "
                      "against them).")
  flags.DEFINE_integer("k", 5, "Nearest training images listed per synthetic image.")
  flags.DEFINE_string("out", "score_out", "Output folder (replaced as a whole).")
  flags.DEFINE_integer("batch_size", 64, "Images per embedding batch.")
  flags.DEFINE_integer("chunk", 2048, "Images read into memory at a time.")
  flags.DEFINE_integer("num_threads", 4, "Image reading threads.")
  flags.DEFINE_bool("align", None, "Score after rigidly registering the second image (the "
                    "training image) onto the first (the synthetic one): flips x rotations up "
                    "to 9 degrees (deepssim_jax.align). Default: the model's own setting "
                    "(its config.model.align); --noalign scores plain cosines.")


def main(argv: Sequence[str]):
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  cli.run_guarded(lambda: run(
      list(argv[1:]), model=f.model, train=f.train, synth=f.synth, heldout=f.heldout,
      truth=f.truth, k=f.k, out=f.out, batch_size=f.batch_size, chunk=f.chunk,
      num_threads=f.num_threads, align=f.align), verbose=cli.verbose_requested(cli.VERBOSE.value))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
