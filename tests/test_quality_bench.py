"""bench/quality_bench.py --smoke runs every configuration end to end and writes its results
and plots (a benchmark: nothing here checks how fast or how good)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("quality")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quality_bench.py"),
                         "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    return out, json.load(f), proc.stdout


def test_every_configuration_has_finite_positive_bits(smoke):
  _, record, _ = smoke
  settings, results = record["settings"], record["results"]
  got = {(r["dataset"], r["seq_len"], r["attention"]): r for r in results}
  size = settings["digits_size"]**2
  expected = {("pystdlib", n, a) for n in settings["text_seq_lens"] for a in settings["attentions"]}
  digits = f"digits{settings['digits_size']}"
  expected |= {(digits, size, a) for a in settings["attentions"]}
  expected |= {("pystdlib", n, "fixed") for n in settings["context_seq_lens"]}
  assert set(got) == expected and len(results) == len(expected)
  for key, r in got.items():
    assert "error" not in r, (key, r.get("error"))
    for name in ("bits", "step_seconds", "peak_rss_gb"):
      assert math.isfinite(r[name]) and r[name] > 0, (key, name, r[name])
    assert r["steps_done"] == settings["steps"]
    assert r["unit"] == ("bits_per_dim" if key[0] == digits else "bits_per_byte")
    assert len(r["curve_bits"]) == len(r["curve_steps"]) == len(r["curve_seconds"]) > 0
    assert all(math.isfinite(b) and b > 0 for b in r["curve_bits"])
    assert r["curve_steps"][-1] == settings["steps"]
    # equal tokens per step in every configuration
    assert r["batch_size"] * r["seq_len"] == settings["tokens_per_step"]
  for n in settings["context_seq_lens"]:
    assert "context" in got[("pystdlib", n, "fixed")]["studies"]


def test_plots_are_pngs(smoke):
  out, record, _ = smoke
  settings = record["settings"]
  names = {f"curves_pystdlib_{n}.png" for n in settings["text_seq_lens"]}
  names |= {f"curves_digits{settings['digits_size']}.png", "context.png"}
  assert {os.path.basename(p) for p in record["plots"]} == names
  for name in names:
    head = (out / name).read_bytes()[:8]
    assert head == PNG, name


def test_prints_both_tables(smoke):
  _, _, stdout = smoke
  assert "| data | seq_len | attention | validation bits |" in stdout
  assert "| context (seq_len) | batch | validation bits/byte |" in stdout
