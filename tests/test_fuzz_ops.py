"""Fuzzing the raw ops (issue 13): a clean error, or a result equal to the reference.

Hypothesis throws tables, shapes, attributes, dtypes and NaN / inf values at
every raw op (forward and gradient, eager, tf.function and GradientTape) for
20 s, in a worker process (tests/fuzz_ops_worker.py, which also
holds the float64 references): a segfault, an abort or a hang ends the worker
and fails this test with the last input, instead of killing pytest.

Longer campaigns (a random seed, restarts after a crash): `python scripts/fuzz_ops.py
--seconds 600`. Knobs: FUZZ_SECONDS (wall time of the worker, TensorFlow's import
included; default 20: over 1000 cases), FUZZ_SEED (default 0).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests import fuzz_ops_worker as fuzz  # noqa: E402


def test_fuzz_raw_ops(tmp_path):
  """No crash, hang, silent wrong result or unclean exception; and the counts are sane."""
  seconds = float(os.environ.get("FUZZ_SECONDS", "20"))
  summary = fuzz.supervise(seconds, int(os.environ.get("FUZZ_SEED", "0")), tmp_path,
                           restart=False, case_timeout=20)
  c = summary["counts"]
  report = fuzz.markdown(summary) + "\n" + fuzz.describe(summary, save_dir=tmp_path)
  print(report)
  assert not summary["crashes"], f"a case crashed the worker:\n{report}"
  assert not summary["hangs"], f"a case hung:\n{report}"
  assert c.get("wrong", 0) == 0, f"silent wrong results:\n{report}"
  assert c.get("unclean", 0) == 0, f"exceptions other than clean errors:\n{report}"
  assert c.get("harness", 0) == 0, f"the reference failed (a bug of the fuzzer):\n{report}"
  # Sane counts: the budget ran many cases, the valid generator's calls were
  # accepted and compared, and the other generators met the checks.
  tried, valid = c.get("tried", 0), c.get("tried_valid", 0)
  assert tried >= 20 * seconds / 2, f"too few cases for {seconds} s:\n{report}"
  assert c.get("equal_nonempty", 0) >= tried / 5, report
  assert c.get("equal_valid", 0) >= 0.8 * valid, f"valid cases were rejected:\n{report}"
  assert c.get("error", 0) >= tried / 5, report


# --- the checks can fail ------------------------------------------------------------------
def _case(op, dtype="float32", mode="eager", scale=0.5):
  """A valid case of a real pattern (Fixed, 2 layout heads, 4 heads) with a causal tile."""
  from sparse_attention_tf import patterns
  t = patterns.Fixed(32, 8, heads=2, head_groups=2).plan(64, 16).parts[0].tables
  assert (t.mask_index >= 0).any()
  floats = {"sdd": {"a": (2, 64, 4, 5), "b": (2, 64, 4, 5)},
            "dsd": {"p": (2, 2, t.nnz, 16, 16), "x": (2, 64, 4, 5)},
            "softmax": {"x": (2, 2, t.nnz, 16, 16)},
            "softmax_grad": {"y": (2, 2, t.nnz, 16, 16), "dy": (2, 2, t.nnz, 16, 16)},
            "attention": {"q": (2, 64, 4, 5), "k": (2, 64, 4, 5), "v": (2, 64, 4, 3)}}[op]
  tabs = {"blocks": t.blocks, "row_offsets": t.row_offsets, "col_offsets": t.col_offsets,
          "col_blocks": t.col_blocks, "mask_index": t.mask_index,
          "mask_key_range": t.mask_key_range, "mask_query_range": t.mask_query_range}
  inputs = []
  for k, name in enumerate(fuzz.SIGNATURES[op][0]):
    if name in floats:
      inputs.append([name, fuzz.normal(floats[name], k, dtype)])
    elif name in ("masks", "mask_split"):
      inputs.append([name, fuzz.table(getattr(t, name), "bool")])
    elif name == "key_padding_mask":
      inputs.append([name, fuzz.table(np.arange(64)[None].repeat(2, 0) < [[64], [50]], "bool")])
    else:
      inputs.append([name, fuzz.table(tabs[name])])
  attrs = {"block_size": 16, "scale": scale}
  return {"kind": "valid", "op": op, "dtype": dtype, "mode": mode, "upstream": 3,
          "attrs": {a: attrs[a] for a in fuzz.SIGNATURES[op][1]}, "inputs": inputs}


@pytest.mark.parametrize("op,mode", [("sdd", "eager"), ("dsd", "graph"), ("softmax", "tape"),
                                     ("attention", "tape")])
def test_valid_case_equals_reference(ops, op, mode):
  assert fuzz.run_case(_case(op, mode=mode)) == ("equal", "")


@pytest.mark.parametrize("op", ["sdd", "dsd", "softmax", "attention"])
def test_wrong_result_is_caught(ops, monkeypatch, op):
  """A reference off by one part in 10^3 of an output (or by one leaked masked element)
  makes a valid case 'wrong': the fuzz test can fail on a wrong kernel."""
  real = fuzz.reference

  def off(op_name, x, *args, **kwargs):
    refs = real(op_name, x, *args, **kwargs)
    refs[0] = refs[0] * (1 + 1e-3)
    return refs

  monkeypatch.setattr(fuzz, "reference", off)
  verdict, detail = fuzz.run_case(_case(op))
  assert verdict == "wrong" and "differ" in detail, (verdict, detail)


def test_masked_nan_leak_is_caught(ops, monkeypatch):
  """NaN in a key that query 0 cannot see (causal) must not reach query 0's row: an
  output with that NaN is a silent wrong result, while NaN in the rows that see
  the key is what the reference says too."""
  case = _case("attention")
  k = dict(case["inputs"])["k"]
  k["poison"] = [[(0 * 64 + 40) * 4 * 5 + 1 * 5 + 2, "nan"]]     # batch 0, key 40, head 1
  x = fuzz.realize(case)
  out = fuzz.reference("attention", x)[0]
  assert np.isnan(out[0, 40:, 1]).any() and not np.isnan(out[0, :40]).any()
  real = fuzz.call

  def leaky(case_, x_):
    outs = real(case_, x_)
    outs[0] = outs[0].copy()
    outs[0][0, 0, 1, 0] = np.nan          # query 0, head 1
    return outs

  monkeypatch.setattr(fuzz, "call", leaky)
  verdict, detail = fuzz.run_case(case)
  assert verdict == "wrong" and "(0, 0, 1, 0)" in detail, (verdict, detail)


def test_accepting_an_invalid_table_is_wrong(ops, monkeypatch):
  """An accepted call on tables the contract calls invalid is 'wrong', not 'equal'."""
  monkeypatch.setattr(fuzz, "contract_problem", lambda *a: "pretend the tables are invalid")
  assert fuzz.run_case(_case("sdd")) == (
      "wrong", "accepted an input that breaks the contract (pretend the tables are invalid)")


def test_rejected_call_is_a_clean_error(ops):
  case = _case("sdd")
  case["attrs"]["block_size"] = 24    # 64 tokens are not 24-token blocks
  verdict, detail = fuzz.run_case(case)
  assert verdict == "error" and "InvalidArgumentError" in detail, (verdict, detail)


# --- the non-finite semantics (module doc of tests/fuzz_ops_worker.py) ------------------------
def _poison(case, name, flat_index, value="nan", mult=None):
  spec = dict(case["inputs"])[name]
  spec["poison"] = [[flat_index, value]]
  if mult is not None:
    spec["mult"] = mult
  return case


def _with_output(monkeypatch, edit):
  """fuzz.call with `edit(outs)` applied to the kernel's outputs."""
  real = fuzz.call

  def edited(case_, x_):
    outs = [o.copy() for o in real(case_, x_)]
    edit(outs)
    return outs

  monkeypatch.setattr(fuzz, "call", edited)


def test_nan_in_v_may_fill_its_tile_only(ops, monkeypatch):
  """A NaN in v (batch 0, key 40, head 1) may reach every query row of a kept tile
  holding key 40 (query 32 shares the causal tile (2, 2) but cannot see key 40),
  not a row of a block row without such a tile (query 0)."""
  case = _poison(_case("attention"), "v", (0 * 64 + 40) * 4 * 3 + 1 * 3 + 1)
  assert fuzz.run_case(case) == ("equal", "")
  x = fuzz.realize(case)
  assert not np.isnan(fuzz.reference("attention", x)[0][0, 32, 1]).any()
  _with_output(monkeypatch, lambda outs: outs[0].__setitem__((0, 32, 1), np.nan))
  assert fuzz.run_case(case) == ("equal", "")
  _with_output(monkeypatch, lambda outs: outs[0].__setitem__((0, 0, 1, 0), np.nan))
  verdict, detail = fuzz.run_case(case)
  assert verdict == "wrong" and "(0, 0, 1, 0)" in detail, (verdict, detail)


@pytest.mark.parametrize("name", ["q", "k"])
def test_dropped_nan_is_caught(ops, monkeypatch, name):
  """A NaN in q or k that the reference puts in a row (out and lse) must show there."""
  case = _poison(_case("attention"), name, (0 * 64 + 40) * 4 * 5 + 1 * 5 + 2)
  assert fuzz.run_case(case) == ("equal", "")
  _with_output(monkeypatch, lambda outs: outs.__setitem__(0, np.nan_to_num(outs[0], nan=0.0)))
  verdict, detail = fuzz.run_case(case)
  assert verdict == "wrong" and "reference np.float64(nan)" in detail, (verdict, detail)


def test_exact_zero_coefficients_are_skipped(ops):
  """dsd with P = 0 and NaN / inf in x gives 0 (not 0 * NaN); softmax_grad gives 0
  where y = 0, whatever dy holds."""
  for value in ("nan", "inf"):
    dsd = _poison(_case("dsd"), "x", 7, value)
    dict(dsd["inputs"])["p"]["mult"] = 0.0
    assert fuzz.run_case(dsd) == ("equal", ""), value
    grad = _poison(_case("softmax_grad"), "dy", 7, value)
    dict(grad["inputs"])["y"]["mult"] = 0.0
    assert fuzz.run_case(grad) == ("equal", ""), value
    x = fuzz.realize(grad)
    with np.errstate(invalid="ignore"):
      assert not fuzz.reference("softmax_grad", x)[0].any()


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("mode", ["eager", "tape"])
def test_nonfinite_scale_is_a_clean_error(ops, scale, mode):
  """The fused ops refuse a non-finite scale (the two placements of the scale, module
  doc, give different results there); the fuzzer counts that as a clean error."""
  case = _case("attention", mode=mode, scale=scale)
  assert fuzz.contract_problem("attention", fuzz.realize(case), case["attrs"])
  assert fuzz.run_case(case)[0] == "error"
  if np.isinf(scale):
    x = fuzz.realize(case)
    with np.errstate(all="ignore"):
      a, b = (fuzz.reference("attention", x, placement=p)[0] for p in fuzz.SCALE_PLACEMENTS)
    assert not np.array_equal(np.isnan(a), np.isnan(b))

