"""Independent float64 NumPy references: dense masked attention and its gradients.

Written from the definitions, sharing no code with the package.
"""

import numpy as np


def visible_mask(mask, heads, key_padding_mask, batch):
  """[B, H, N, N] bool: head h uses mask[h % Hp]; padded keys hidden."""
  hp, n, _ = mask.shape
  vis = np.broadcast_to(mask[np.arange(heads) % hp][None], (batch, heads, n, n)).copy()
  if key_padding_mask is not None:
    vis &= np.asarray(key_padding_mask, bool)[:, None, None, :]
  return vis


def attention(q, k, v, mask, scale, key_padding_mask=None, dout=None):
  """Masked softmax attention in float64; rows with no visible key give 0.

  q, k: [B, N, H, D]; v: [B, N, H, Dv]; mask: bool [Hp, N, N].
  Returns out [B, N, H, Dv], and (dq, dk, dv) if dout is given.
  """
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, n, h, _ = q.shape
  vis = visible_mask(mask, h, key_padding_mask, b)                 # (B, H, N, N)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(vis, s, -np.inf)
  mx = s.max(axis=-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  e = np.where(vis, np.exp(s - mx), 0.0)
  den = e.sum(axis=-1, keepdims=True)
  p = e / np.where(den > 0, den, 1.0)                              # (B, H, N, N)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  if dout is None:
    return out
  dout = np.asarray(dout, np.float64)
  dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
  dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
  ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  return out, (dq, dk, dv)


def rel_err(x, ref):
  """max |x - ref| / max |ref| (absolute when ref is all zeros)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.abs(ref).max()
  return np.abs(x - ref).max() / (scale if scale > 0 else 1.0)
