"""The HTML report: parses, is self-contained, embeds decodable PNGs, most suspicious first."""

import base64
import html.parser
import io as _io
import os

import numpy as np
import pytest
from PIL import Image

from deepssim_jax import io, report

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
  return Image.open(_io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))


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


def _build(gallery_size=4, scale=2, **kw):
  summary, scores, labels, sids, tids, synth, train = _inputs(**kw)
  cfg = report.default_config()
  cfg.gallery_size, cfg.gallery_scale = gallery_size, scale
  text = report.build_report(summary, scores, labels, sids, tids, synth, train,
                             {"t_low": 0.6, "t_high": 0.85, "dar": 0.9}, cfg,
                             extra={"mi": scores * 10})
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
  hist = [a for a in p.imgs if a.get("class") == "hist"]
  assert len(hist) == 1
  assert _decode(hist[0]["src"]).size == (640, 360)
  # Self-contained: every resource is a data URI, nothing runs.
  assert all(a["src"].startswith("data:") for a in p.imgs)
  assert "script" not in p.tags and "http://" not in text and "https://" not in text
  out = report.write_report(str(tmp_path / "report.html"), text)
  assert open(out, encoding="utf-8").read() == text
  assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left


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
  diff = np.asarray(Image.open(_io.BytesIO(pngs["diff"])))
  assert diff.shape == (3, 4) and (diff == 0).all()
  pngs = report.pair_pngs(a + 1.0, a, scale=3, diff_vmax=2.0)
  diff = np.asarray(Image.open(_io.BytesIO(pngs["diff"])))
  assert diff.shape == (9, 12) and (diff == 128).all()  # |1| / 2 of full scale
  synth = np.asarray(Image.open(_io.BytesIO(pngs["synth"])))
  assert synth.min() == 0 and synth.max() == 255
  with pytest.raises(io.InputError, match="mismatched image sizes"):
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
  chromium = report.find_chromium()
  if chromium is None:
    reason = (f"no Chromium binary found (tried {report.CHROMIUM_NAMES} and "
              "$DEEPSSIM_CHROMIUM); install with apt-get install -y --no-install-recommends "
              "chromium")
    print(reason)
    pytest.skip(reason)
  n_pairs = 6
  text, _, _ = _build(gallery_size=n_pairs)
  page = report.write_report(str(tmp_path / "report.html"), text)
  # The report as is: no console message at all (it has no script; a failed resource
  # load or a CSP/security complaint would show here), and a screenshot that is not blank.
  out = report.render_headless(page, str(tmp_path / "shot.png"), window=(1200, 1600),
                               chromium=chromium)
  assert out["returncode"] == 0, out["stderr"][-2000:]
  assert out["console"] == [], out["console"]
  stats = report.screenshot_stats(out["screenshot"])
  assert (stats["width"], stats["height"]) == (1200, 1600)
  assert stats["std"] > 20 and stats["non_white"] > 0.02, stats
  # A probing copy: every image (histogram + 3 per pair) was decoded and laid out.
  out = report.render_headless(page, str(tmp_path / "probe.png"), window=(1200, 1600),
                               chromium=chromium, probe=True)
  assert out["returncode"] == 0, out["stderr"][-2000:]
  assert len(out["console"]) == 1 and (f"deepssim-probe images={3 * n_pairs + 1} broken=0"
                                       in out["console"][0]), out["console"]
  # Negative control: a corrupted image is caught by the probe.
  start = text.index('class="gallery"')
  src = text.index("base64,", start) + len("base64,")
  bad = report.write_report(str(tmp_path / "bad.html"), text[:src] + "AAAA" + text[src + 40:])
  out = report.render_headless(bad, str(tmp_path / "bad.png"), window=(1200, 1600),
                               chromium=chromium, probe=True)
  assert any("image not shown: synthetic" in c for c in out["console"]), out["console"]
  assert any("broken=1" in c for c in out["console"]), out["console"]
