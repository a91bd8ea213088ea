"""Draw a pattern's mask as a picture, like the figures of the paper.

    from sparse_attention_tf import Fixed, plotting
    plotting.plot_pattern(Fixed(stride=16, summary=4), seq_len=128, path="fixed.png")

Each panel is one head: rows are queries, columns keys; kept elements are
dark, and with `block_size` the elements of the kept blocks the kernels
compute are shaded (for parts run on the transposed sequence, those blocks
are drawn back in the original order, where they are strided, not square).
The title (the pattern's repr, N and the density) is wrapped to the figure's
width, and the layout keeps it and the axis labels inside the figure.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from sparse_attention_tf import patterns as patterns_lib

PANEL_INCHES = 3.0      # width of one head's panel (and the figure's height before the title)
TITLE_FONTSIZE = 9


def _wrap_to_width(text: str, width_inches: float, fontsize: float,
                   fraction: float = 0.95) -> list:
  """Splits `text` into lines that fit `fraction` of `width_inches`.

  Lines break after the commas of a pattern's repr (`stride=128,` `summary=32,`
  ...), never inside a parameter; widths are those of matplotlib's default
  font at `fontsize` points.

  Args:
    text: the text, e.g. `repr(pattern) + ", N=256, density 0.137"`.
    width_inches: the width of the figure the text goes on.
    fontsize: its font size in points.
    fraction: the share of the width a line may take.

  Returns:
    The lines (a part longer than a line by itself stays whole, on its own line).
  """
  from matplotlib.font_manager import FontProperties
  from matplotlib.textpath import TextToPath
  font = FontProperties(size=fontsize)
  limit = fraction * width_inches * 72                               # points

  def width(line):
    return TextToPath().get_text_width_height_descent(line, font, ismath=False)[0]

  lines = []
  for part in re.split(r"(?<=,) ", text):
    if lines and width(f"{lines[-1]} {part}") <= limit:
      lines[-1] = f"{lines[-1]} {part}"
    else:
      lines.append(part)
  return lines


def plot_pattern(pattern: patterns_lib.Pattern, seq_len: int, path: Optional[str] = None,
                 heads: Optional[Sequence[int]] = None, block_size: Optional[int] = None,
                 dpi: int = 100):
  """Plots `pattern.mask(seq_len)`; saves a PNG when `path` is given.

  Args:
    pattern: the pattern to draw.
    seq_len: sequence length (keep it small, e.g. <= 512: the mask is N x N).
    path: output file (PNG); None to only return the figure.
    heads: which pattern heads to draw (default: all, at most 8).
    block_size: also shade the kept blocks of the block layout at this size.
    dpi: resolution of the saved file.

  Returns:
    The matplotlib Figure.
  """
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  mask = pattern.mask(seq_len)                                       # (H, N, N)
  heads = list(range(min(mask.shape[0], 8))) if heads is None else list(heads)
  for h in heads:
    if not 0 <= h < mask.shape[0]:
      raise ValueError(f"heads must be in [0, {mask.shape[0]}), got {h}.")
  image = mask[heads].astype(np.float32)                             # (h, N, N)
  if block_size is not None:
    kept = np.zeros_like(image)
    plan = pattern.plan(seq_len, block_size)
    for part in plan.parts:
      lay = part.tables.element_mask()                               # (Hl, N, N) in part order
      part_heads = range(pattern.num_heads) if part.heads is None else part.heads
      for k, h in enumerate(part_heads):
        if h not in heads:
          continue
        b = block_size
        blocks = lay[k % lay.shape[0]].reshape(seq_len // b, b, seq_len // b, b).any(axis=(1, 3))
        computed = np.kron(blocks, np.ones((b, b)))                  # elements the kernel computes
        if part.transpose is not None:                               # back to original order
          inv = np.argsort(patterns_lib.transpose_permutation(seq_len, part.transpose))
          computed = computed[np.ix_(inv, inv)]
        kept[heads.index(h)] = computed
    image = np.maximum(image, 0.25 * kept)

  width = PANEL_INCHES * len(heads)
  title = _wrap_to_width(f"{pattern!r}, N={seq_len}, density {mask[heads].mean():.3f}", width,
                         TITLE_FONTSIZE)
  # Above the panels, room for the title's lines; the layout then keeps the
  # title, the axis labels and the tick labels inside the figure.
  height = PANEL_INCHES + len(title) * TITLE_FONTSIZE * 1.4 / 72
  fig, axes = plt.subplots(1, len(heads), figsize=(width, height), squeeze=False,
                           layout="constrained")
  for ax, h, img in zip(axes[0], heads, image):
    ax.imshow(img, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"head {h}", fontsize=9)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle("\n".join(title), fontsize=TITLE_FONTSIZE)
  # The first layout pass sees tick labels of the axes' initial size (aspect 1
  # shrinks them after it): one draw here lets every later draw lay out the
  # final sizes, so the saved file and the returned figure are not clipped.
  fig.draw_without_rendering()
  if path is not None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
  return fig


def plot_curves(panels: Sequence[tuple], ylabel: str, title: str, path: Optional[str] = None,
                log2_x: bool = False, dpi: int = 100):
  """Line plots side by side, one line per named series (learning curves, scaling plots).

      plot_curves([("step", {"dense": (steps, bits), "fixed": (steps, bits2)}),
                   ("seconds", {"dense": (secs, bits), "fixed": (secs2, bits2)})],
                  "validation bits/byte", "pystdlib, seq_len 4096", "curves.png")

  Args:
    panels: `(x label, {name: (xs, ys)})` per panel; a name keeps its colour in
      every panel.
    ylabel: the y axis of every panel.
    title: the figure's title.
    path: output file (PNG); None to only return the figure.
    log2_x: a base-2 logarithmic x axis (e.g. context lengths 256 ... 16384).
    dpi: resolution of the saved file.

  Returns:
    The matplotlib Figure.
  """
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(name for _, series in panels for name in series))
  colours = {name: f"C{i}" for i, name in enumerate(names)}
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False,
                           layout="constrained")
  for ax, (xlabel, series) in zip(axes[0], panels):
    for name, (xs, ys) in series.items():
      ax.plot(xs, ys, marker="o", markersize=3, label=name, color=colours[name])
    if log2_x:
      ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=TITLE_FONTSIZE)
  if path is not None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
  return fig
