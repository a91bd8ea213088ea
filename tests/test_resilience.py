"""Checkpoints that survive kills, exact resume with dropout, preemption and lost workers.

1. In-process (the library: `training.fit`, `checkpointing`): a run resumed
   with dropout ends bitwise where the uninterrupted run ends, also from a
   checkpoint taken mid-epoch; a damaged newest checkpoint is skipped for
   the previous one with one line; none loadable, a damaged state file, a
   0.1 Keras backup are each handled.
2. `train_main.py` (default strategy, real signals): SIGTERM saves and exits
   42 with one line; the resumed run is SIGKILLed while it writes a
   checkpoint; a second resume finishes with the weights of an uninterrupted
   run (dropout 0.1).
3. Two workers on 127.0.0.1 under `scripts/supervise_workers.py`: SIGKILL of
   worker 1 (the survivor says so in one line and exits 42), restart of both
   with --resume, SIGTERM of worker 0 (both save at one step and exit 42),
   restart: the weights of an uninterrupted two-worker run (dropout 0.1),
   which runs in the background from the module's start.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "train_main.py")
SUPERVISOR = os.path.join(REPO_ROOT, "scripts", "supervise_workers.py")
TIMEOUT = 240


# ---------------------------------------------------------------------------
# 1. The library, in this process

VOCAB, SEQ = 32, 64


def _tiny_model(dropout=0.1):
  """A fresh tiny compiled model (seed 0) and its training config pieces."""
  import keras
  import sparse_attention_tf as sat
  keras.utils.set_random_seed(0)
  return sat.SparseTransformer(vocab_size=VOCAB, seq_len=SEQ, num_layers=1, d_model=32,
                               num_heads=2, pattern=sat.Fixed(16, 4), block_size=16,
                               dropout=dropout)


def _tiny_run(backup_dir, steps=10, resume=False, stop_after_epochs=None, every=None,
              lines=None, train=True):
  """Trains a fresh tiny model with `training.fit` (dropout 0.1); returns (model, result)."""
  import tensorflow as tf
  from sparse_attention_tf import training
  model = _tiny_model()
  config = training.TrainConfig(steps=steps, batch_size=4, steps_per_epoch=5,
                                validation_steps=1, backup_dir=backup_dir, resume=resume,
                                verbose=0, stop_after_epochs=stop_after_epochs,
                                save_every_steps=every, warmup_steps=2, learning_rate=1e-2)
  training.compile_model(model, config)
  model(np.zeros((1, SEQ), np.int32))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (40, SEQ + 1)).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices((tokens[:, :-1], tokens[:, 1:])).repeat().batch(4)
  result = training.fit(model, ds, ds.take(1), config,
                        print_fn=(lines.append if lines is not None else print))
  return model, result


def _assert_same_weights(a, b):
  for wa, wb in zip(a.get_weights(), b.get_weights()):
    np.testing.assert_array_equal(wa, wb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """U: 10 steps in one go. A: the same run stopped after epoch 1, with checkpoints at
  steps 3 (mid-epoch, save_every_steps=3) and 5 (the epoch's end)."""
  u, result = _tiny_run(str(tmp_path_factory.mktemp("uninterrupted")))
  assert result["steps_done"] == 10
  a_dir = str(tmp_path_factory.mktemp("interrupted"))
  _, result = _tiny_run(a_dir, stop_after_epochs=1, every=3)
  assert result["steps_done"] == 5
  assert sorted(glob.glob(os.path.join(a_dir, "ckpt-*.index"))) == [
      os.path.join(a_dir, f"ckpt-{n}.index") for n in (3, 5)]
  return u, a_dir


def _copy(a_dir, tmp_path):
  backup = str(tmp_path / "backup")
  shutil.copytree(a_dir, backup)
  return backup


def test_fit_resume_with_dropout_is_exact(runs, tmp_path):
  """A resumed from ckpt-5: the weights of U, bitwise (the dropout masks' seed state is in
  the checkpoint; on 0.1, whose masks came from TF's global generator, they differed)."""
  u, a_dir = runs
  backup = _copy(a_dir, tmp_path)
  resumed, result = _tiny_run(backup, resume=True)
  assert result["steps_done"] == 10 and len(result["history"]["loss"]) == 1
  _assert_same_weights(resumed, u)


def test_damaged_newest_checkpoint_falls_back_mid_epoch(runs, tmp_path):
  """ckpt-5 cut to 96 bytes: the resume says so in one line, continues from ckpt-3
  (mid-epoch) and still ends exactly at U."""
  u, a_dir = runs
  backup = _copy(a_dir, tmp_path)
  with open(os.path.join(backup, "ckpt-5.data-00000-of-00001"), "r+b") as f:
    f.truncate(96)
  lines = []
  resumed, result = _tiny_run(backup, resume=True, lines=lines)
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"checkpoint {backup}/ckpt-5 cannot be loaded (") and \
      lines[0].endswith("): falling back to ckpt-3"), lines
  # Two fit calls: the rest of epoch 1 (steps 4-5), then epoch 2.
  assert result["steps_done"] == 10 and len(result["history"]["loss"]) == 2, result
  _assert_same_weights(resumed, u)


def test_no_loadable_checkpoint_is_one_clear_error(runs, tmp_path):
  from sparse_attention_tf import checkpointing
  backup = _copy(runs[1], tmp_path)
  for data in glob.glob(os.path.join(backup, "ckpt-*.data-*")):
    with open(data, "r+b") as f:
      f.truncate(0)
  lines = []
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no checkpoint in .* can be loaded \(ckpt-5: .*; ckpt-3: .*\): "
                           r"start over without --resume"):
    _tiny_run(backup, resume=True, lines=lines)
  assert len(lines) == 2 and lines[1].endswith("no older checkpoint"), lines


def test_damaged_state_file_uses_the_checkpoint_files(runs, tmp_path):
  """The manager's `checkpoint` state file replaced by garbage: the complete `ckpt-N`
  files are found and restored anyway."""
  from sparse_attention_tf import checkpointing
  backup = _copy(runs[1], tmp_path)
  with open(os.path.join(backup, "checkpoint"), "wb") as f:
    f.write(b"\x00garbage{{")
  assert checkpointing.find_checkpoint(backup) == os.path.join(backup, "ckpt-5")
  from sparse_attention_tf import training
  model = _tiny_model()
  model(np.zeros((1, SEQ), np.int32))
  training.compile_model(model, training.TrainConfig(steps=10, warmup_steps=2))
  model.optimizer.build(model.trainable_variables)
  checkpoint = checkpointing.RunCheckpoint(model, model.optimizer, None)
  assert checkpoint.restore(backup) == os.path.join(backup, "ckpt-5")
  assert int(checkpoint.step.numpy()) == 5


def test_a_keras_backup_of_version_0_1_is_named(tmp_path):
  from sparse_attention_tf import checkpointing
  (tmp_path / "latest.weights.h5").write_bytes(b"\x89HDF" + bytes(92))
  with pytest.raises(checkpointing.CheckpointError, match="Keras BackupAndRestore backup"):
    checkpointing.find_checkpoint(str(tmp_path))


def test_checkpoint_holds_the_dropout_state(runs):
  """Each seed generator (the block's dropout seeds) is in the checkpoint, advanced by
  the 5 training steps from its initial state."""
  import tensorflow as tf
  from sparse_attention_tf import checkpointing
  fresh = checkpointing.rng_state_variables(_tiny_model())
  assert len(fresh) >= 1
  reader = tf.train.load_checkpoint(os.path.join(runs[1], "ckpt-5"))
  names = sorted(n for n, _ in tf.train.list_variables(os.path.join(runs[1], "ckpt-5"))
                 if n.startswith("rng/"))
  assert len(names) == len(fresh), names
  advanced = 0
  for name, state in zip(names, fresh):
    saved, initial = reader.get_tensor(name), state.numpy()
    assert saved[0] == initial[0] and saved[1] >= initial[1], (name, saved, initial)
    advanced += int(saved[1] > initial[1])
  assert advanced >= 1, names    # the block's (the attention's own Dropout has rate 0)


# ---------------------------------------------------------------------------
# 2. train_main.py under real signals (default strategy)

RUN = ["--dataset=pydoc", "--num_layers=2", "--d_model=64", "--num_heads=2", "--batch_size=4",
       "--seq_len=64", "--block_size=16", "--stride=16", "--summary=4", "--validation_steps=1",
       "--verbose=0", "--dropout=0.1", "--sample_tokens=8", "--steps=20",
       "--steps_per_epoch=5", "--seed=0", "--learning_rate=3e-3", "--warmup_steps=2"]


def _env(extra=None):
  env = dict(os.environ)
  env.pop("TF_CONFIG", None)
  env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT, CUDA_VISIBLE_DEVICES="")
  env.update(extra or {})
  return env


def _start(args, log):
  out, err = open(log + ".stdout", "w"), open(log + ".stderr", "w")
  proc = subprocess.Popen([sys.executable, SCRIPT] + args, env=_env(), stdout=out, stderr=err,
                          cwd=os.path.dirname(log))
  out.close()
  err.close()
  return proc


def _wait(proc, timeout=TIMEOUT):
  try:
    return proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"process {proc.args} did not end within {timeout} s")


def _read(log, kind="stderr"):
  with open(f"{log}.{kind}") as f:
    return f.read()


def _wait_for(predicate, proc, what, timeout=TIMEOUT, poll=0.05):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"the process ended ({proc.returncode}) before {what}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(poll)


def _weights(out_dir):
  import keras
  import sparse_attention_tf  # noqa: F401  (registers the layers)
  return keras.saving.load_model(os.path.join(out_dir, "model.keras")).get_weights()


def _one_error_line(log):
  lines = [l for l in _read(log).splitlines() if l.startswith("train_main.py:")]
  assert len(lines) == 1, _read(log)
  assert "Traceback" not in _read(log), _read(log)
  return lines[0]


def test_train_main_sigterm_then_sigkill_in_a_checkpoint_write(tmp_path):
  """U: uninterrupted. A: SIGTERM after the first checkpoint -> exit 42, one line, a
  checkpoint at the step it names. B: --resume, SIGKILL as soon as a checkpoint's
  temporary files appear (during the write). C: --resume -> finishes; weights equal U's."""
  ref, out = str(tmp_path / "uninterrupted"), str(tmp_path / "run")
  u = _start(RUN + [f"--output_dir={ref}"], str(tmp_path / "u"))
  backup = os.path.join(out, "backup")
  a_log = str(tmp_path / "a")
  a = _start(RUN + [f"--output_dir={out}"], a_log)
  _wait_for(lambda: os.path.exists(os.path.join(backup, "ckpt-5.index")), a, "ckpt-5")
  a.send_signal(signal.SIGTERM)
  assert _wait(a) == 42, _read(a_log)
  line = _one_error_line(a_log)
  match = re.fullmatch(r"train_main\.py: preempted \(SIGTERM\): checkpoint at step (\d+) in "
                       + re.escape(backup) + r"; restart with --resume to continue", line)
  assert match, line
  preempted_at = int(match.group(1))
  assert 5 < preempted_at < 20 and os.path.exists(os.path.join(backup,
                                                               f"ckpt-{preempted_at}.index"))

  # B: killed inside a checkpoint write (TF writes into `ckpt-N_temp/` first).
  b_log = str(tmp_path / "b")
  b = _start(RUN + [f"--output_dir={out}", "--resume", "--save_every_steps=1"], b_log)

  def writing():
    names = os.listdir(backup) if os.path.isdir(backup) else []
    return any(n.endswith("_temp") or ".tempstate" in n for n in names)

  _wait_for(writing, b, "a checkpoint write", poll=0.0005)
  b.kill()
  b.wait()
  left = sorted(os.listdir(backup))
  # C resumes from what the kill left (the state file lists complete checkpoints only).
  c_log = str(tmp_path / "c")
  c = _start(RUN + [f"--output_dir={out}", "--resume"], c_log)
  assert _wait(c) == 0, _read(c_log)
  assert _wait(u) == 0, _read(str(tmp_path / "u"))
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["steps_done"] == 20
  for wc, wu in zip(_weights(out), _weights(ref)):
    np.testing.assert_array_equal(wc, wu)
  print("files left by the kill:", left)


# ---------------------------------------------------------------------------
# 3. Two workers under the supervisor: a lost worker and a preemption

MW_RUN = RUN[:1] + ["--num_layers=1", "--d_model=32"] + RUN[3:] + ["--strategy=multi_worker"]


def _supervise(log_dir, out_dir, name):
  """Starts scripts/supervise_workers.py with two MW_RUN workers (logs in `log_dir`)."""
  with open(f"{name}.stdout", "w") as o, open(f"{name}.stderr", "w") as e:
    return subprocess.Popen([sys.executable, SUPERVISOR, "--workers=2", "--max_restarts=2",
                             "--grace_seconds=60", f"--log_dir={log_dir}", "--"] + MW_RUN +
                            [f"--output_dir={out_dir}"], env=_env(), stdout=o, stderr=e)


@pytest.fixture(scope="module", autouse=True)
def two_worker_reference(request, tmp_path_factory):
  """The uninterrupted two-worker run of the last test, started with the module: its two
  workers take the core that the in-process tests and the single train_main runs of the
  SIGTERM test leave idle. Yields (supervisor, output folder, log folder, log name)."""
  if not any(item.originalname == "test_two_workers_lost_worker_and_preemption"
             for item in request.session.items if item.module is request.module):
    yield None
    return
  base = tmp_path_factory.mktemp("two_worker_reference")
  ref, ref_logs, log = str(base / "ref"), str(base / "ref_logs"), str(base / "ref_supervisor")
  sup = _supervise(ref_logs, ref, log)
  try:
    yield sup, ref, ref_logs, log
  finally:
    if sup.poll() is None:   # the test did not wait for it: SIGTERM goes on to the workers
      sup.terminate()
      try:
        sup.wait(60)
      except subprocess.TimeoutExpired:
        sup.kill()


def _checksum(log):
  match = re.search(r"weight checksum (\S+)", _read(log, "stdout"))
  assert match, _read(log, "stdout") + _read(log)
  return match.group(1)


def test_two_workers_lost_worker_and_preemption(tmp_path, two_worker_reference):
  logs, out = str(tmp_path / "logs"), str(tmp_path / "run")
  sup_log = str(tmp_path / "supervisor")
  sup = _supervise(logs, out, sup_log)
  backup = os.path.join(out, "backup")

  def pids(gen):
    found = re.search(rf"generation {gen}: worker 0 pid (\d+), worker 1 pid (\d+)",
                      _read(sup_log, "stdout"))
    return found and (int(found.group(1)), int(found.group(2)))

  # Generation 0: SIGKILL worker 1 after the first checkpoint.
  _wait_for(lambda: os.path.exists(os.path.join(backup, "ckpt-5.index")) and pids(0), sup,
            "generation 0's first checkpoint")
  os.kill(pids(0)[1], signal.SIGKILL)
  # Generation 1 (resumed): SIGTERM worker 0 after its next checkpoint.
  _wait_for(lambda: pids(1) and os.path.exists(os.path.join(backup, "ckpt-10.index")), sup,
            "generation 1's checkpoint at step 10")
  os.kill(pids(1)[0], signal.SIGTERM)
  assert _wait(sup, timeout=2 * TIMEOUT) == 0, _read(sup_log, "stdout") + _read(sup_log)
  # The reference: uninterrupted (started with the module, `two_worker_reference`).
  ref_sup, ref, ref_logs, ref_log = two_worker_reference
  assert _wait(ref_sup, timeout=TIMEOUT) == 0, _read(ref_log, "stdout") + _read(ref_log)
  assert "generation 1" not in _read(ref_log, "stdout")

  stdout = _read(sup_log, "stdout")
  assert "worker 1 killed by signal 9" in stdout and "worker 0 exit 42" in stdout, stdout
  # The survivor of generation 0: one line naming the lost peer, exit 42.
  survivor = os.path.join(logs, "gen0_worker0")
  line = _one_error_line(survivor)
  assert line.startswith("train_main.py: lost contact with a peer worker at step "), line
  assert line.endswith("restart every worker with --resume to continue from the last "
                       "checkpoint"), line
  # Generation 1: both workers saved at the same step and exited 42.
  steps = []
  for w in (0, 1):
    line = _one_error_line(os.path.join(logs, f"gen1_worker{w}"))
    steps.append(re.search(r"checkpoint at step (\d+)", line).group(1))
  assert steps[0] == steps[1] and int(steps[0]) >= 10, steps
  # Generation 2 finished with the weights of the uninterrupted run (dropout 0.1).
  for w in (0, 1):
    assert _checksum(os.path.join(logs, f"gen2_worker{w}")) == _checksum(
        os.path.join(ref_logs, "gen0_worker0")), w
  for wc, wu in zip(_weights(out), _weights(ref)):
    np.testing.assert_array_equal(wc, wu)
