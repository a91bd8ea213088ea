"""Draw a pattern's mask as a picture, like the figures of the paper.

    from sparse_attention_tf import Fixed, plotting
    plotting.plot_pattern(Fixed(stride=16, summary=4), seq_len=128, path="fixed.png")

Each panel is one head: rows are queries, columns keys; kept elements are
dark, and with `block_size` the elements of the kept blocks the kernels
compute are shaded (for parts run on the transposed sequence, those blocks
are drawn back in the original order, where they are strided, not square).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sparse_attention_tf import patterns as patterns_lib


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

  fig, axes = plt.subplots(1, len(heads), figsize=(3 * len(heads), 3.2), squeeze=False)
  for ax, h, img in zip(axes[0], heads, image):
    ax.imshow(img, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"head {h}", fontsize=9)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle(f"{pattern!r}, N={seq_len}, density {mask[heads].mean():.3f}", fontsize=9)
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
  return fig
