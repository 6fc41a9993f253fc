"""A self-contained HTML memorization report a person can read offline.

One file, nothing to fetch: inline CSS, no scripts, every picture a base64 PNG data URI.
It shows the headline figures (counts per class, memorization rate, share of training
images copied, calibrated rates), the histogram of nearest-training scores with the
threshold lines, a gallery of the most similar synthetic/training pairs, most suspicious
(highest score) first: synthetic image, its nearest training image and their absolute
difference side by side, with the scores; then every summary value (thresholds,
calibrations, fingerprints) in a table. Every piece of text is HTML-escaped.

Images are z-scored floats; each is shown min-max scaled to 8 bits (so contrast changes
of a copy do not hide it), upscaled by an integer factor with nearest-neighbour pixels.
The difference image is |synthetic - training| in z units, mapped linearly from 0 (black)
to `diff_vmax` (white); a flipped or rotated copy shows a large difference there even
with a high DeepSSIM score, which is the point of DeepSSIM.

With explanation maps (deepssim_jax.explain, computed by the caller with the audit's
model), each pair also shows, per explained score, both images with their multi-scale
LayerCAM map laid over them: the colormap `overlay_colormap` of the map (0 dark blue,
1 dark red for turbo) blended with weight `overlay_alpha` over the grey image.

Whether the page renders in a browser is checked by deepssim_jax.headless.
"""

import base64
import html
import io
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image

from deepssim_jax import evaluate, fileio, plots

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
color:#1b1b1b;background:#fff}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.4em 0 .5em}
.headline{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.stat{border:1px solid #ccc;border-radius:6px;padding:8px 14px;min-width:140px}
.stat .v{font-size:1.4em;font-weight:600}.stat .k{color:#555;font-size:.85em}
table.kv{border-collapse:collapse;font-size:.9em}
table.kv td{border-bottom:1px solid #e3e3e3;padding:3px 10px 3px 0;vertical-align:top}
table.kv td.k{color:#444;font-family:ui-monospace,monospace}
img.hist{max-width:100%;border:1px solid #ddd}
.gallery{display:flex;flex-wrap:wrap;gap:16px}
figure.pair{margin:0;border:1px solid #ccc;border-radius:6px;padding:8px;background:#fafafa}
figure.pair .imgs{display:flex;gap:6px}
figure.pair .cell{text-align:center;font-size:.75em;color:#555}
img.gallery,img.overlay{display:block;image-rendering:pixelated;background:#000}
figcaption{font-size:.85em;margin-top:6px;line-height:1.35}
.c1{color:#b00020;font-weight:600}.c2{color:#a15c00}.c0{color:#1a5e20}
.note{color:#555;font-size:.85em}
details summary{cursor:pointer;color:#444;margin-bottom:6px}
"""


def default_config() -> ml_collections.ConfigDict:
  """The `report` config section."""
  c = ml_collections.ConfigDict()
  c.title = "DeepSSIM memorization audit"
  c.gallery_size = 24       # most suspicious pairs shown
  c.gallery_scale = 2       # integer upscaling of gallery images
  c.diff_vmax = 2.0         # |synthetic - training| (z units) shown as white
  c.hist_bins = 50
  c.hist_width_in = 6.4
  c.hist_height_in = 3.6
  c.hist_dpi = 100
  c.overlay_alpha = 0.6     # weight of the colour map over the grey image (reference: 0.6)
  c.overlay_colormap = "turbo"  # matplotlib colormap of explanation maps (reference: turbo)
  return c


# ---------------------------------------------------------------------------------------
# Pictures.

def to_uint8(image: np.ndarray, vmin: Optional[float] = None,
             vmax: Optional[float] = None) -> np.ndarray:
  """Linear map of [vmin, vmax] (default the image's min and max) to 0..255, clipped."""
  x = np.asarray(image, np.float64)
  if x.ndim != 2:
    raise ValueError(f"need a (H, W) image, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("image contains NaN or infinity")
  lo = float(x.min()) if vmin is None else float(vmin)
  hi = float(x.max()) if vmax is None else float(vmax)
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour integer upscaling."""
  if scale < 1 or int(scale) != scale:
    raise ValueError(f"scale must be a positive integer, got {scale}")
  return np.repeat(np.repeat(image, int(scale), axis=0), int(scale), axis=1)


def png_bytes(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 (H, W) grey or (H, W, 3) RGB image (deterministic: no metadata)."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def pair_pngs(synth: np.ndarray, train: np.ndarray, scale: int = 2,
              diff_vmax: float = 2.0) -> dict[str, bytes]:
  """PNGs of a synthetic image, its training match and |synthetic - training|."""
  synth = np.asarray(synth, np.float64)
  train = np.asarray(train, np.float64)
  if synth.shape != train.shape:
    raise fileio.InputError(f"mismatched image sizes: synthetic {synth.shape} vs training "
                        f"{train.shape}")
  diff = np.abs(synth - train)
  return {"synth": png_bytes(upscale(to_uint8(synth), scale)),
          "train": png_bytes(upscale(to_uint8(train), scale)),
          "diff": png_bytes(upscale(to_uint8(diff, 0.0, diff_vmax), scale))}


def overlay_rgb(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6,
                colormap: str = "turbo") -> np.ndarray:
  """An explanation map laid over its image: uint8 (H, W, 3).

  Args:
    image: (H, W) image, shown min-max scaled to grey.
    heat: (H, W) map in [0, 1] (clipped), coloured with the matplotlib colormap.
    alpha: weight of the colour (1 - alpha of the grey image).
    colormap: a matplotlib colormap name.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top  (slow import, only needed here)
  heat = np.asarray(heat, np.float64)
  if heat.shape != np.shape(image):
    raise ValueError(f"map of shape {heat.shape} for an image of shape {np.shape(image)}")
  if not np.all(np.isfinite(heat)):
    raise ValueError("explanation map contains NaN or infinity")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
  grey = to_uint8(image).astype(np.float64)[..., None] / 255.0
  colour = matplotlib.colormaps[colormap](np.clip(heat, 0.0, 1.0))[..., :3]
  rgb = alpha * colour + (1.0 - alpha) * grey
  return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_pngs(synth: np.ndarray, train: np.ndarray, synth_map: np.ndarray,
                 train_map: np.ndarray, scale: int = 2, alpha: float = 0.6,
                 colormap: str = "turbo") -> dict[str, bytes]:
  """PNGs of a pair's two images with their explanation maps laid over (overlay_rgb)."""
  return {"synth": png_bytes(upscale(overlay_rgb(synth, synth_map, alpha, colormap), scale)),
          "train": png_bytes(upscale(overlay_rgb(train, train_map, alpha, colormap), scale))}


def histogram_png(scores: np.ndarray, lines: Mapping[str, float], bins: int = 50,
                  size: Sequence[float] = (6.4, 3.6), dpi: int = 100,
                  title: str = "") -> bytes:
  """PNG of the histogram of nearest-training scores with labelled vertical lines.

  Args:
    scores: (n,) nearest-training scores.
    lines: {label: x} thresholds to draw (e.g. t_low, t_high, Dar's threshold).
    bins, size (inches), dpi, title: the figure.
  """
  return plots.histogram([("synthetic images", scores, "tab:blue")], lines, bins=bins,
                         size=size, dpi=dpi, title=title, xlabel="nearest-training score",
                         ylabel="synthetic images")


# ---------------------------------------------------------------------------------------
# HTML.

def gallery_order(scores: Sequence[float], limit: int) -> np.ndarray:
  """Indices of the `limit` highest scores, highest first, ties by lower index."""
  s = np.asarray(scores, np.float64).reshape(-1)
  return np.lexsort((np.arange(len(s)), -s))[:max(0, int(limit))]


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    return "nan" if not math.isfinite(v) else f"{v:.4g}"
  if isinstance(v, (list, tuple, np.ndarray)):
    return ", ".join(_fmt(x) for x in v)
  return str(v)


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out += _flatten(v, key + ".")
    else:
      out.append((key, v))
  return out


def _pct(v) -> str:
  return "-" if v is None else f"{100 * float(v):.1f}%"


# Captions of the explanation maps (deepssim_jax.explain's scores).
MAP_NAMES = {"similarity": "what makes them match", "dissimilarity": "where they differ"}
MAP_NOTE = ("Explanation maps ({name}): {how}, scaled to [0, 1] per image; the high end "
            "of the colour map (red in turbo) marks the regions that most {what}. An exact "
            "copy (cosine 1) has a flat map.")
MAP_NOTE_WHAT = {"similarity": "raise the two images' similarity",
                 "dissimilarity": "lower the two images' similarity"}

RULE_NAMES = {"paper": f"paper thresholds ({evaluate.CLASS_NAMES[1].capitalize()})",
              "dar": "Dar et al.",
              "mi": "Memorization Index", "carlini": "Carlini et al."}


def _validation(v: Optional[Mapping]) -> list[str]:
  """The 'against known answers' section (truth.validate's dict), or nothing."""
  if not v:
    return []
  esc = html.escape
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  rows = "".join(
      f'<tr><td>{esc(RULE_NAMES.get(rule, rule))}</td><td>{r["tp"]} / {r["tp"] + r["fn"]}'
      f'</td><td>{pct(r["recall"])}</td><td>{pct(r["precision"])}</td>'
      f'<td>{r["fp"]} / {r["fp"] + r["tn"]}</td><td>{pct(r["false_positive_rate"])}</td></tr>'
      for rule, r in v["rules"].items())
  notes = [f'{v["n_memorized"]} synthetic images are known copies, '
           f'{v["n_not_memorized"]} are not.']
  if v.get("auc") is not None:
    notes.append(f'ROC AUC of the nearest-training score: {v["auc"]:.3f}.')
  if v.get("source_match") is not None:
    notes.append(f'{pct(v["source_match"])} of the flagged copies are matched to the '
                 'training image they were made from.')
  return ['<section id="validation"><h2>Against known answers</h2>'
          f'<p class="note">{esc(" ".join(notes))}</p><table class="kv">'
          '<tr><td class="k">rule</td><td class="k">copies flagged</td><td class="k">recall'
          '</td><td class="k">precision</td><td class="k">others flagged</td>'
          f'<td class="k">false-positive rate</td></tr>{rows}</table></section>']


def _headline(summary: Mapping) -> str:
  stats = []
  counts = summary.get("counts", {})
  for key in (evaluate.CLASS_NAMES[c] for c in (1, 2, 0)):
    if key in counts:
      stats.append((f"{key.capitalize()} (synthetic)", str(counts[key])))
  if "memorization_rate" in summary:
    stats.append(("memorization rate", _pct(summary["memorization_rate"])))
  if "share_training_copied" in summary:
    stats.append(("training images copied", _pct(summary["share_training_copied"])))
  if "n_subjects" in summary:
    stats.append(("subjects copied",
                  f'{summary["n_subjects_copied"]} / {summary["n_subjects"]}'))
  for name, cal in summary.get("calibration", {}).items():
    if isinstance(cal, Mapping) and "memorization_rate" in cal:
      stats.append((f"{name} memorization rate", _pct(cal["memorization_rate"])))
  return "".join(f'<div class="stat"><div class="v">{html.escape(v)}</div>'
                 f'<div class="k">{html.escape(k)}</div></div>' for k, v in stats)


def render_html(summary: Mapping[str, Any], hist_png: bytes,
                gallery: Sequence[Mapping[str, Any]], title: str = "",
                notes: Sequence[str] = ()) -> str:
  """The report as one HTML string.

  Args:
    summary: the audit summary (nested dicts of JSON values); every leaf is listed, the
      keys counts / memorization_rate / share_training_copied / calibration.*.
      memorization_rate also appear as headline figures.
    hist_png: the histogram PNG.
    gallery: pairs in display order, each a dict with synth_id, train_id, score, label
      (0/1/2, the paper class), synth_png, train_png, diff_png (PNG bytes), optional
      extra {name: value} (calibrated values shown under the pair) and optional overlays
      {score name: {"synth": PNG, "train": PNG}} (explanation maps, one row per score).
    title: page title.
    notes: free-text paragraphs shown under the title.
  """
  esc = html.escape
  title = title or "Memorization audit"
  parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<link rel="icon" href="data:,">',
           f'<title>{esc(title)}</title><style>{_CSS}</style></head><body>',
           f'<h1>{esc(title)}</h1>']
  parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
  parts.append(f'<section id="summary"><h2>Summary</h2><div class="headline">'
               f'{_headline(summary)}</div></section>')
  parts += _validation(summary.get("validation"))
  parts.append('<section id="histogram"><h2>Nearest-training scores</h2>'
               f'<img class="hist" alt="histogram of nearest-training scores" '
               f'src="{data_uri(hist_png)}"></section>')
  parts.append(f'<section id="gallery"><h2>Most similar pairs ({len(gallery)}), most '
               'suspicious first</h2><div class="gallery">')
  for rank, g in enumerate(gallery, 1):
    label = int(g["label"])
    extra = "".join(f"<br>{esc(str(k))}: {esc(_fmt(v))}"
                    for k, v in dict(g.get("extra", {})).items())
    cells = "".join(
        f'<div class="cell"><img class="gallery" alt="{esc(what)} {esc(str(g[idk]))}" '
        f'src="{data_uri(g[key])}">{esc(what)}</div>'
        for what, key, idk in (("synthetic", "synth_png", "synth_id"),
                               ("training", "train_png", "train_id"),
                               ("|difference|", "diff_png", "synth_id")))
    rows = "".join(
        f'<div class="imgs" data-map="{esc(score)}">' + "".join(
            f'<div class="cell"><img class="overlay" alt="{esc(what)} {esc(str(g[idk]))} '
            f'{esc(score)} map" src="{data_uri(pngs[side])}">{esc(what)}: '
            f'{esc(MAP_NAMES.get(score, score))}</div>'
            for what, side, idk in (("synthetic", "synth", "synth_id"),
                                    ("training", "train", "train_id"))) + '</div>'
        for score, pngs in dict(g.get("overlays", {})).items())
    parts.append(
        f'<figure class="pair" data-rank="{rank}" data-score="{float(g["score"])!r}">'
        f'<div class="imgs">{cells}</div>{rows}<figcaption>#{rank} '
        f'<span class="c{label}">{esc(evaluate.CLASS_NAMES[label].capitalize())}</span> '
        f'score {esc(_fmt(float(g["score"])))}<br>synthetic: {esc(str(g["synth_id"]))}'
        f'<br>training: {esc(str(g["train_id"]))}{extra}</figcaption></figure>')
  parts.append('</div></section>')
  # Every summary value (thresholds, calibrations, fingerprints), folded: a <details>
  # element opens without any script.
  flat = _flatten(summary)
  parts.append(f'<section id="details"><h2>Details</h2><details open><summary>All summary '
               f'values ({len(flat)})</summary><table class="kv">')
  parts += [f'<tr><td class="k">{esc(k)}</td><td>{esc(_fmt(v))}</td></tr>' for k, v in flat]
  parts.append('</table></details></section></body></html>\n')
  return "\n".join(parts)


def build_report(summary: Mapping[str, Any], scores: np.ndarray, labels: np.ndarray,
                 synth_ids: Sequence[str], train_ids: Sequence[str],
                 synth_images: np.ndarray, train_images: np.ndarray,
                 lines: Mapping[str, float], cfg: ml_collections.ConfigDict,
                 extra: Optional[Mapping[str, np.ndarray]] = None,
                 notes: Sequence[str] = (),
                 explainer: Optional[Callable[[np.ndarray, np.ndarray],
                                              Mapping[str, Sequence[np.ndarray]]]] = None,
                 map_how: str = "explanation maps of the DeepSSIM score") -> str:
  """Renders the report of an audit (nothing is written).

  Args:
    summary: the audit summary.
    scores: (n,) nearest-training score of every synthetic image.
    labels: (n,) paper class of every synthetic image.
    synth_ids: (n,) synthetic ids; train_ids: (n,) id of each one's nearest training image.
    synth_images: (n, H, W) synthetic images; train_images: (n, H, W) the nearest training
      image of each (row-aligned with synth_images). Only the gallery rows are read, so
      memory-mapped arrays are fine.
    lines: threshold lines of the histogram.
    cfg: the `report` config section.
    extra: per-image columns shown in the gallery captions (e.g. mi, oni).
    notes: paragraphs under the title.
    explainer: (synthetic (m, H, W), training (m, H, W)) of the gallery pairs -> {score
      name: (synthetic maps, training maps)} in [0, 1] (explain.explain_pairs with the
      audit's model); each score's maps are laid over the pair's images (overlay_pngs),
      one row per score. None: no maps.
    map_how: how the maps were computed (explain.describe), for their caption.
  """
  s = np.asarray(scores, np.float64).reshape(-1)
  n = len(s)
  if not (len(labels) == len(synth_ids) == len(train_ids) == len(synth_images)
          == len(train_images) == n):
    raise ValueError("scores, labels, ids and images must have one row per synthetic image")
  order = gallery_order(s, int(cfg.gallery_size))
  synth = [np.asarray(synth_images[i]) for i in order]  # each gallery row read once
  train = [np.asarray(train_images[i]) for i in order]
  maps = {}
  if explainer is not None and len(order):
    for a, b in zip(synth, train):
      if a.shape != b.shape:  # before stacking, as pair_pngs would say
        raise fileio.InputError(f"mismatched image sizes: synthetic {a.shape} vs training "
                            f"{b.shape}")
    maps = dict(explainer(np.stack(synth), np.stack(train)))
  scale = int(cfg.gallery_scale)
  gallery = []
  for j, i in enumerate(order):
    pngs = pair_pngs(synth[j], train[j], scale, float(cfg.diff_vmax))
    overlays = {score: overlay_pngs(synth[j], train[j], m_synth[j], m_train[j], scale,
                                    float(cfg.overlay_alpha), str(cfg.overlay_colormap))
                for score, (m_synth, m_train) in maps.items()}
    gallery.append({"synth_id": synth_ids[i], "train_id": train_ids[i], "score": s[i],
                    "label": int(labels[i]), "synth_png": pngs["synth"],
                    "train_png": pngs["train"], "diff_png": pngs["diff"],
                    "overlays": overlays,
                    "extra": {k: np.asarray(v)[i] for k, v in dict(extra or {}).items()}})
  notes = list(notes) + [MAP_NOTE.format(name=MAP_NAMES.get(score, score), how=map_how,
                                         what=MAP_NOTE_WHAT.get(score, score))
                         for score in maps]
  hist = histogram_png(s, lines, int(cfg.hist_bins), (cfg.hist_width_in, cfg.hist_height_in),
                       int(cfg.hist_dpi))
  return render_html(summary, hist, gallery, str(cfg.title), notes)


def write_report(path: str, text: str) -> str:
  """Writes the HTML atomically. Returns path."""
  fileio.write_text(path, text)
  return path
