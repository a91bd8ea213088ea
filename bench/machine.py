"""The machine line every benchmark table starts with: CPU model, the
instruction sets the kernels care about, and the fused attention's engines."""

from __future__ import annotations

import os

_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_model_and_flags():
  """(model name, [the flags of _FLAGS this CPU has]) from /proc/cpuinfo."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model == "unknown CPU":
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return model, [f for f in _FLAGS if f in flags]


def machine_line() -> str:
  """One line: CPU, its relevant flags, core count, and the engines chosen."""
  import sparse_attention_tf.ops as ops  # lazily: imports TensorFlow
  model, flags = cpu_model_and_flags()
  engines = ops.cpu_engines()
  return (f"Machine: {model}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none'}; "
          f"engines: float32 {engines['float32']}, bfloat16 "
          f"{engines['bfloat16'] or 'converted to float32'} (this CPU runs: "
          f"{', '.join(engines['available'])})")
