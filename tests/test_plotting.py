"""The mask-drawing helper writes a real PNG of the mask, with nothing clipped."""

import matplotlib.image
import numpy as np
import pytest

from sparse_attention_tf import patterns, plotting


def test_png_shows_the_mask(tmp_path):
  path = tmp_path / "fixed.png"
  fig = plotting.plot_pattern(patterns.Fixed(16, 4, heads=2, head_groups=2), 64, str(path),
                              block_size=16)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3 and img.shape[1] > img.shape[0]           # two panels side by side
  assert len(fig.axes) == 2
  # The first panel's image is the mask of head 0 (kept = 1, computed-but-hidden = 0.25).
  data = np.asarray(fig.axes[0].images[0].get_array())
  mask = patterns.Fixed(16, 4, heads=2, head_groups=2).mask(64)[0]
  assert np.array_equal(data == 1.0, mask)
  assert ((data == 0.25) | (data == 1.0)).sum() > mask.sum()    # whole kept blocks shaded


def test_transposed_part_is_drawn_in_original_order(tmp_path):
  pattern = patterns.Strided(8, heads=2, mode="split")
  fig = plotting.plot_pattern(pattern, 64, block_size=16, heads=[1])
  data = np.asarray(fig.axes[0].images[0].get_array())
  assert np.array_equal(data == 1.0, pattern.mask(64)[1])


def test_bad_head_is_a_value_error():
  with pytest.raises(ValueError, match="heads"):
    plotting.plot_pattern(patterns.Dense(), 32, heads=[3])


@pytest.mark.parametrize("heads", [1, 8])
def test_title_and_labels_are_inside_the_figure(heads):
  """A long pattern repr is wrapped to the figure's width, above the panels, and every
  title, axis label and tick label lies inside the figure (as the renderer draws them)."""
  import matplotlib.pyplot as plt
  pattern = patterns.Fixed(stride=128, summary=32, heads=heads, head_groups=min(heads, 4))
  fig = plotting.plot_pattern(pattern, 256, block_size=32)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  title = [t for t in fig.texts if t.get_text().startswith("Fixed(")]
  assert len(title) == 1, [t.get_text() for t in fig.texts]
  text = title[0].get_text()
  assert text.replace("\n", " ").startswith(f"{pattern!r}, N=256, density "), text
  assert (text.count("\n") >= 1) == (heads == 1), text   # 3 inches wrap it; 24 do not
  boxes = {"title": title[0].get_window_extent(renderer)}
  for i, ax in enumerate(fig.axes):
    boxes[f"panel {i} with its labels"] = ax.get_tightbbox(renderer)
    boxes[f"panel {i} title"] = ax.title.get_window_extent(renderer)
    boxes[f"panel {i} x label"] = ax.xaxis.label.get_window_extent(renderer)
    boxes[f"panel {i} y label"] = ax.yaxis.label.get_window_extent(renderer)
  figure = fig.bbox
  for name, box in boxes.items():
    assert (figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and
            box.y1 <= figure.y1), (name, box.extents, figure.extents)
  top_of_panels = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
  assert boxes["title"].y0 >= top_of_panels, "the title overlaps the panels"
  plt.close(fig)
