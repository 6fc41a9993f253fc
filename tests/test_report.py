"""The HTML report: parses, is self-contained, embeds decodable PNGs, most suspicious first."""

import base64
import html.parser
import io
import os

import numpy as np
import pytest
from PIL import Image

from deepssim_jax import fileio, headless, report

H, W = 12, 10
VOID = {"meta", "link", "img", "br", "hr", "input"}


class _Parser(html.parser.HTMLParser):
  """Collects img and figure attributes and checks that non-void tags are balanced."""

  def __init__(self):
    super().__init__()
    self.imgs, self.figures, self.stack, self.errors, self.text = [], [], [], [], []
    self.tags = []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.tags.append(tag)
    if tag == "img":
      self.imgs.append(a)
    elif tag == "figure":
      self.figures.append(a)
    if tag not in VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
    else:
      self.stack.pop()

  def handle_data(self, data):
    self.text.append(data)


def _parse(text):
  p = _Parser()
  p.feed(text)
  p.close()
  assert not p.errors, p.errors
  assert not p.stack, p.stack
  return p


def _decode(src):
  prefix = "data:image/png;base64,"
  assert src.startswith(prefix), src[:40]
  return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))


def _inputs(n=10, seed=0):
  rng = np.random.default_rng(seed)
  scores = rng.uniform(0.3, 1.0, n)
  labels = np.where(scores <= 0.6, 0, np.where(scores > 0.85, 1, 2))
  synth_ids = [f"synth-{i}" for i in range(n)]
  synth_ids[int(np.argmax(scores))] = "<script>alert('x')</script>&id"
  train_ids = [f"train-{i % 3}" for i in range(n)]
  synth = rng.normal(size=(n, H, W)).astype(np.float32)
  train = rng.normal(size=(n, H, W)).astype(np.float32)
  summary = {"counts": {"duplicate": int((labels == 1).sum()),
                        "similar": int((labels == 2).sum()),
                        "different": int((labels == 0).sum())},
             "memorization_rate": float((labels == 1).mean()),
             "share_training_copied": 0.5, "thresholds": {"t_low": 0.6, "t_high": 0.85},
             "fingerprints": {"checkpoint": "<b>abc</b>"},
             "calibration": {"mi": {"memorization_rate": 0.1, "mu_null": 0.7}}}
  return summary, scores, labels, synth_ids, train_ids, synth, train


def _build(gallery_size=4, scale=2, explainer=None, **kw):
  summary, scores, labels, sids, tids, synth, train = _inputs(**kw)
  cfg = report.default_config()
  cfg.gallery_size, cfg.gallery_scale = gallery_size, scale
  text = report.build_report(summary, scores, labels, sids, tids, synth, train,
                             {"t_low": 0.6, "t_high": 0.85, "dar": 0.9}, cfg,
                             extra={"mi": scores * 10}, explainer=explainer)
  return text, scores, sids


def test_report_parses_and_embeds_gallery_pngs(tmp_path):
  text, scores, sids = _build(gallery_size=4, scale=2)
  p = _parse(text)
  gallery = [a for a in p.imgs if a.get("class") == "gallery"]
  assert len(p.figures) == 4
  assert len(gallery) == 3 * 4  # synthetic, training, difference per pair
  for a in gallery:
    im = _decode(a["src"])
    im.load()
    assert im.format == "PNG" and im.size == (W * 2, H * 2) and im.mode == "L"
  assert not [a for a in p.imgs if a.get("class") == "overlay"]  # no maps without a model
  hist = [a for a in p.imgs if a.get("class") == "hist"]
  assert len(hist) == 1
  assert _decode(hist[0]["src"]).size == (640, 360)
  # Self-contained: every resource is a data URI, nothing runs.
  assert all(a["src"].startswith("data:") for a in p.imgs)
  assert "script" not in p.tags and "http://" not in text and "https://" not in text
  out = report.write_report(str(tmp_path / "report.html"), text)
  assert open(out, encoding="utf-8").read() == text
  assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left


def _ramp_maps(a, b):
  """A stand-in explainer: each image's map is its own min-max scaled intensity."""
  scale = lambda x: (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(  # noqa: E731
      x, axis=(1, 2), keepdims=True)
  return {"similarity": (scale(a), scale(b)), "dissimilarity": (1 - scale(a), 1 - scale(b))}


def test_gallery_shows_explanation_maps_as_overlays():
  summary, scores, labels, sids, tids, synth, train = _inputs()
  cfg = report.default_config()
  cfg.gallery_size = 3
  calls = []

  def explainer(a, b):
    calls.append((a, b))
    return _ramp_maps(a, b)

  text = report.build_report(summary, scores, labels, sids, tids, synth, train,
                             {"t_low": 0.6}, cfg, explainer=explainer, map_how="ramp maps")
  p = _parse(text)
  order = np.argsort(-scores)[:3]
  assert len(calls) == 1  # one call with the gallery rows, most suspicious first
  np.testing.assert_array_equal(calls[0][0], synth[order])
  np.testing.assert_array_equal(calls[0][1], train[order])
  overlays = [a for a in p.imgs if a.get("class") == "overlay"]
  assert len(overlays) == 3 * 2 * 2  # pairs x scores x (synthetic, training)
  assert len([a for a in p.imgs if a.get("class") == "gallery"]) == 3 * 3  # unchanged
  assert overlays[0]["alt"] == f"synthetic {sids[order[0]]} similarity map"
  assert overlays[3]["alt"] == f"training {tids[order[0]]} dissimilarity map"
  for a in overlays:
    im = _decode(a["src"])
    im.load()
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (W * 2, H * 2)
  assert text.count('data-map="similarity"') == 3 and "what makes them match" in text
  assert "Explanation maps (what makes them match): ramp maps, scaled" in text
  # The brightest pixel of the synthetic image (map 1) gets turbo's top colour (dark red)
  # at alpha 0.6 over white.
  import matplotlib  # pylint: disable=g-import-not-at-top
  rgb = np.asarray(_decode(overlays[0]["src"]))[::2, ::2].astype(float)
  top = np.unravel_index(np.argmax(synth[order[0]]), (H, W))
  want = 255 * (0.6 * np.asarray(matplotlib.colormaps["turbo"](1.0)[:3]) + 0.4)
  np.testing.assert_allclose(rgb[top], want, atol=1)
  assert rgb[top][0] > rgb[top][2] + 60


def test_overlay_rgb_blends_colormap_over_grey():
  import matplotlib  # pylint: disable=g-import-not-at-top
  img = np.arange(12, dtype=np.float32).reshape(3, 4)
  heat = np.linspace(0, 1, 12).reshape(3, 4)
  grey = report.overlay_rgb(img, heat, alpha=0.0)
  np.testing.assert_array_equal(grey, np.repeat(report.to_uint8(img)[..., None], 3, -1))
  full = report.overlay_rgb(img, heat, alpha=1.0, colormap="viridis")
  want = np.round(matplotlib.colormaps["viridis"](heat)[..., :3] * 255)
  np.testing.assert_allclose(full, want, atol=1)
  half = report.overlay_rgb(img, heat, alpha=0.5).astype(float)
  np.testing.assert_allclose(half, 0.5 * report.overlay_rgb(img, heat, 1.0)
                             + 0.5 * grey, atol=1)
  with pytest.raises(ValueError, match="shape"):
    report.overlay_rgb(img, heat[:, :3])
  with pytest.raises(ValueError, match="NaN"):
    report.overlay_rgb(img, np.full((3, 4), np.nan))


def test_gallery_is_most_suspicious_first():
  text, scores, sids = _build(gallery_size=5)
  p = _parse(text)
  shown = [float(f["data-score"]) for f in p.figures]
  np.testing.assert_array_equal(shown, np.sort(scores)[::-1][:5])
  assert [int(f["data-rank"]) for f in p.figures] == [1, 2, 3, 4, 5]
  # The captions name the synthetic images in that order.
  alts = [a["alt"] for a in p.imgs if a.get("class") == "gallery"][::3]
  want = [sids[i] for i in np.argsort(-scores)[:5]]
  assert alts == [f"synthetic {s}" for s in want]


def test_gallery_order_ties_and_limits():
  np.testing.assert_array_equal(report.gallery_order([0.5, 0.9, 0.9, 0.1], 3), [1, 2, 0])
  assert len(report.gallery_order([0.5, 0.9], 10)) == 2
  assert len(report.gallery_order([0.5, 0.9], 0)) == 0
  text, _, _ = _build(gallery_size=50, scale=1, n=6)
  p = _parse(text)
  assert len(p.figures) == 6
  assert _decode(p.imgs[1]["src"]).size == (W, H)


def test_text_is_escaped():
  text, _, _ = _build()
  assert "<script>" not in text and "<b>abc</b>" not in text
  assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;id" in text
  assert "&lt;b&gt;abc&lt;/b&gt;" in text
  p = _parse(text)
  assert "<script>alert('x')</script>&id" in "".join(p.text)  # shown literally


def test_pair_pngs_difference_image():
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  pngs = report.pair_pngs(a, a, scale=1, diff_vmax=2.0)
  diff = np.asarray(Image.open(io.BytesIO(pngs["diff"])))
  assert diff.shape == (3, 4) and (diff == 0).all()
  pngs = report.pair_pngs(a + 1.0, a, scale=3, diff_vmax=2.0)
  diff = np.asarray(Image.open(io.BytesIO(pngs["diff"])))
  assert diff.shape == (9, 12) and (diff == 128).all()  # |1| / 2 of full scale
  synth = np.asarray(Image.open(io.BytesIO(pngs["synth"])))
  assert synth.min() == 0 and synth.max() == 255
  with pytest.raises(fileio.InputError, match="mismatched image sizes"):
    report.pair_pngs(a, a[:, :3])


def test_summary_lists_every_leaf():
  text, _, _ = _build()
  for key in ("counts.duplicate", "memorization_rate", "thresholds.t_high",
              "fingerprints.checkpoint", "calibration.mi.mu_null"):
    assert f'<td class="k">{key}</td>' in text
  assert "training images copied" in text and "50.0%" in text


def test_renders_in_headless_chromium(tmp_path):
  """The report renders in headless Chromium without console messages and shows every image.

  Skips only when no Chromium binary is found (Debian: apt-get install chromium).
  """
  chromium = headless.find_chromium()
  if chromium is None:
    reason = (f"no Chromium binary found (tried {headless.CHROMIUM_NAMES} and "
              "$DEEPSSIM_CHROMIUM); install with apt-get install -y --no-install-recommends "
              "chromium")
    print(reason)
    pytest.skip(reason)
  n_pairs = 6
  # With explanation maps of two scores: 4 RGB overlays per pair besides its 3 images.
  text, _, _ = _build(gallery_size=n_pairs, explainer=lambda a, b: _ramp_maps(a, b))
  page = report.write_report(str(tmp_path / "report.html"), text)
  # The report as is: no console message at all (it has no script; a failed resource
  # load or a CSP/security complaint would show here), and a screenshot that is not blank.
  out = headless.render_headless(page, str(tmp_path / "shot.png"), window=(1200, 1600),
                               chromium=chromium)
  assert out["returncode"] == 0, out["stderr"][-2000:]
  assert out["console"] == [], out["console"]
  stats = headless.screenshot_stats(out["screenshot"])
  assert (stats["width"], stats["height"]) == (1200, 1600)
  assert stats["std"] > 20 and stats["non_white"] > 0.02, stats
  # A probing copy: every image (histogram + 3 + 4 per pair) was decoded and laid out.
  out = headless.render_headless(page, str(tmp_path / "probe.png"), window=(1200, 1600),
                               chromium=chromium, probe=True)
  assert out["returncode"] == 0, out["stderr"][-2000:]
  assert len(out["console"]) == 1 and (f"deepssim-probe images={7 * n_pairs + 1} broken=0"
                                       in out["console"][0]), out["console"]
  # Negative control: a corrupted image is caught by the probe.
  start = text.index('class="gallery"')
  src = text.index("base64,", start) + len("base64,")
  bad = report.write_report(str(tmp_path / "bad.html"), text[:src] + "AAAA" + text[src + 40:])
  out = headless.render_headless(bad, str(tmp_path / "bad.png"), window=(1200, 1600),
                               chromium=chromium, probe=True)
  assert any("image not shown: synthetic" in c for c in out["console"]), out["console"]
  assert any("broken=1" in c for c in out["console"]), out["console"]
