"""PNG figures as bytes, with matplotlib's object API (the Agg canvas: no pyplot, no global
backend change), byte-reproducible (no software/date metadata). Used by the evaluation
histograms, the audit report and comparison, and the LDM trainers' plots.
"""

import io
import math
from typing import Mapping, Optional, Sequence

import numpy as np

_LINE_STYLES = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
_LINE_COLORS = ("k", "k", "tab:red", "tab:purple", "tab:green")


def figure(size: Sequence[float], dpi: int = 100):
  """A matplotlib Figure on an Agg canvas (matplotlib is imported here: it is slow to import
  and only plotting needs it)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=tuple(size), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def png(fig, pad: Optional[float] = None) -> bytes:
  """The figure, laid out tight, as PNG bytes."""
  fig.tight_layout(**({} if pad is None else {"pad": pad}))
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  return buf.getvalue()


def histogram(groups: Sequence[tuple[str, np.ndarray, str]], lines: Mapping[str, float], *,
              bins: int = 50, size: Sequence[float] = (6.4, 4.0), dpi: int = 100,
              title: str = "", xlabel: str = "score", ylabel: str = "count") -> bytes:
  """Overlaid histograms on shared bins, with labelled vertical lines.

  Args:
    groups: (label, scores, colour) per group; empty groups are left out; the legend gives
      each group's size.
    lines: {label: x} (e.g. thresholds); None or non-finite values are not drawn.
    bins, size (inches), dpi, title, xlabel, ylabel: the figure.

  Raises:
    ValueError: no finite score at all, or a non-finite score.
  """
  groups = [(lab, np.asarray(s, np.float64).reshape(-1), col) for lab, s, col in groups]
  groups = [g for g in groups if len(g[1])]
  if not groups or not all(np.all(np.isfinite(s)) for _, s, _ in groups):
    raise ValueError("a histogram needs a non-empty set of finite scores")
  drawn = {k: float(v) for k, v in lines.items() if v is not None and math.isfinite(v)}
  xs = [x for _, s, _ in groups for x in (s.min(), s.max())] + list(drawn.values())
  lo, hi = min(xs), max(xs)
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  fig = figure(size, dpi)
  ax = fig.add_subplot(1, 1, 1)
  alpha = 0.8 if len(groups) == 1 else 0.5
  for lab, s, col in groups:
    ax.hist(s, bins=edges, alpha=alpha, color=col, label=f"{lab} (n={len(s)})")
  for i, (name, v) in enumerate(drawn.items()):
    ax.axvline(v, color=_LINE_COLORS[i % len(_LINE_COLORS)],
               linestyle=_LINE_STYLES[i % len(_LINE_STYLES)], label=f"{name} = {v:.3g}")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize="small")
  return png(fig)


def bars(names: Sequence[str], series: Mapping[str, Sequence[Optional[float]]], *,
         size: Sequence[float] = (7.0, 4.0), dpi: int = 100, title: str = "",
         ylabel: str = "", ylim: Optional[Sequence[float]] = None) -> bytes:
  """Grouped bars: one group per name, one bar per series ({label: values, one per name};
  a None or non-finite value leaves its bar out), each bar labelled with its value."""
  if not names or not series:
    raise ValueError("a bar chart needs at least one name and one series")
  fig = figure(size, dpi)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(series)
  x = np.arange(len(names))
  for i, (label, values) in enumerate(series.items()):
    if len(values) != len(names):
      raise ValueError(f"series {label!r}: {len(values)} values for {len(names)} names")
    v = np.array([np.nan if y is None else float(y) for y in values])
    keep = np.isfinite(v)
    pos = x[keep] + (i - (len(series) - 1) / 2) * width
    drawn = ax.bar(pos, v[keep], width, label=label)
    ax.bar_label(drawn, fmt="%.2f", fontsize=7)
  ax.set_xticks(x, list(names), rotation=20, ha="right", fontsize=8)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  return png(fig)
