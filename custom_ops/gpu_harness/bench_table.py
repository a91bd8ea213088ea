"""Dense baselines on the same GPU, merged with the harness's sparse timings.

Reads the JSON lines the harness wrote (fused block-sparse forward and
forward+backward per sequence length), times on the same GPU, with PyTorch
(no TensorFlow):
  * dense causal attention from cuBLAS GEMMs: QK^T, causal softmax, PV and
    the backward (dV = P^T dO, dP = dO V^T, dS, dQ = dS K, dK = dS^T Q), one
    head at a time so that N = 65536 fits (the N x N scores of 8 heads would
    not);
  * torch's fused causal scaled_dot_product_attention (flash attention), for
    reference;
  * a dense bfloat16 GEMM (8192^3), the ceiling;
and prints / writes a markdown table.

  python3 bench_table.py --sparse out/sparse.json --out out/bench.md

Throughput convention (all columns): forward+backward = 3.5 x the forward's
4 * pairs * D flops, pairs = query-key pairs computed (sparse: kept blocks x
b^2; dense cuBLAS: N^2; flash: N^2 / 2).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _median_ms(torch, fn, reps: int) -> float:
  fn()  # warm-up (cuBLAS handles, allocator)
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end))
  times.sort()
  return times[len(times) // 2]


def _reps(n: int) -> int:
  return 20 if n <= 4096 else 7 if n <= 16384 else 3


def dense_cublas_ms(torch, n: int, heads: int, d: int, dtype) -> float:
  """Forward + backward of dense causal attention, cuBLAS GEMMs, per head."""
  q, k, v, do = (torch.randn(n, heads, d, device="cuda", dtype=dtype) for _ in range(4))
  future = torch.ones(n, n, device="cuda", dtype=torch.bool).triu_(1)  # (N, N) j > i
  scale = d**-0.5

  def step():
    with torch.no_grad():
      for h in range(heads):
        qh, kh, vh, doh = q[:, h], k[:, h], v[:, h], do[:, h]          # (N, D)
        s = (qh @ kh.t()).float().mul_(scale).masked_fill_(future, float("-inf"))  # (N, N)
        p = torch.softmax(s, dim=-1)                                    # (N, N) float
        del s
        pb = p.to(dtype)
        o = pb @ vh                                                     # (N, D)
        dv = pb.t() @ doh
        del pb
        dp = (doh @ vh.t()).float()                                     # (N, N)
        delta = (doh.float() * o.float()).sum(-1, keepdim=True)         # (N, 1)
        ds = p.mul_(dp.sub_(delta)).mul_(scale).to(dtype)               # (N, N)
        del p, dp
        dq = ds @ kh
        dk = ds.t() @ qh
        del ds, dq, dk, dv, o

  ms = _median_ms(torch, step, _reps(n))
  del q, k, v, do, future
  torch.cuda.empty_cache()
  return ms


def sdpa_ms(torch, n: int, heads: int, d: int, dtype) -> float:
  """Forward + backward of torch's fused causal attention (flash)."""
  f = torch.nn.functional
  q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=dtype, requires_grad=True)
             for _ in range(3))
  do = torch.randn(1, heads, n, d, device="cuda", dtype=dtype)

  def step():
    out = f.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(do)

  ms = _median_ms(torch, step, _reps(n))
  del q, k, v, do
  torch.cuda.empty_cache()
  return ms


def gemm_tflops(torch, dtype, size: int = 8192) -> float:
  a = torch.randn(size, size, device="cuda", dtype=dtype)
  b = torch.randn(size, size, device="cuda", dtype=dtype)
  ms = _median_ms(torch, lambda: a @ b, 10)
  return 2 * size**3 / ms * 1e-9


def _flops(pairs: float, d: int, heads: int) -> float:
  return 3.5 * 4 * pairs * d * heads


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sparse", required=True, help="JSON lines written by the harness")
  parser.add_argument("--out", required=True, help="markdown table to write")
  args = parser.parse_args(argv)
  rows = [json.loads(line) for line in pathlib.Path(args.sparse).read_text().splitlines() if line]
  try:
    import torch
    if not torch.cuda.is_available():
      raise ImportError("torch sees no CUDA device")
  except ImportError as e:  # the sparse columns are still worth a table
    print(f"[bench_table] no dense baseline: {e}", file=sys.stderr)
    torch = None
  dtype = None
  if torch is not None and rows:
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[rows[0]["dtype"]]
  ceiling = gemm_tflops(torch, dtype) if torch is not None and rows else float("nan")
  device = torch.cuda.get_device_name() if torch is not None else "?"

  lines = [
      f"Fused block-sparse attention, forward + backward, {device}, "
      f"{rows[0]['dtype'] if rows else '?'}: Fixed(stride=128, summary=32) causal, "
      f"B={rows[0]['batch'] if rows else '?'}, H={rows[0]['heads'] if rows else '?'}, "
      f"D={rows[0]['head_dim'] if rows else '?'}, block {rows[0]['block'] if rows else '?'}. "
      "Median of CUDA-event timed runs. Dense GEMM ceiling "
      f"({'bf16' if rows and rows[0]['dtype'] == 'bfloat16' else 'fp16'} 8192^3, cuBLAS via torch): "
      f"{ceiling:.0f} TFLOP/s.",
      "",
      "| N | kept blocks | element density | sparse fwd (ms) | sparse fwd+bwd (ms) "
      "| dense cuBLAS fwd+bwd (ms) | speedup | torch SDPA (flash) fwd+bwd (ms) "
      "| sparse TFLOP/s | dense TFLOP/s |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    n, h, d = r["seq"], r["heads"], r["head_dim"]
    dense = sdpa = float("nan")
    if torch is not None:
      dense = dense_cublas_ms(torch, n, h, d, dtype)
      sdpa = sdpa_ms(torch, n, h, d, dtype)
    sparse_tf = _flops(r["nnz"] * r["block"] ** 2, d, h * r["batch"]) / r["fwd_bwd_ms"] * 1e-9
    dense_tf = _flops(float(n) * n, d, h) / dense * 1e-9
    lines.append(
        f"| {n} | {r['nnz']} ({100 * r['block_density']:.1f}%) | {100 * r['element_density']:.1f}% "
        f"| {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {dense:.2f} "
        f"| {dense / r['fwd_bwd_ms']:.1f}x | {sdpa:.2f} | {sparse_tf:.0f} | {dense_tf:.0f} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines) + "\n"
  pathlib.Path(args.out).write_text(table)
  print("\n" + table)
  print(f"[bench_table] wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
