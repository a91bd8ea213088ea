"""The mask-drawing helper writes a real PNG of the mask."""

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
