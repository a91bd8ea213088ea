"""Crash-safe training checkpoints, preemption (SIGTERM) and lost workers.

    checkpoint = RunCheckpoint(model, model.optimizer, "run/backup")
    if find_checkpoint("run/backup"):
      checkpoint.restore("run/backup")            # newest loadable; falls back
    ...
    checkpoint.save(step)                          # keeps the newest two

* **What a checkpoint holds** (`RunCheckpoint`): the model's weights, the
  optimizer (its slots, iteration count and, under mixed_float16, loss
  scale), the global step, and the state of every `keras.random.SeedGenerator`
  in the model (`rng_state_variables`: the dropout masks of the next steps),
  so a resumed run continues exactly, dropout included.
* **Crash safety.** `tf.train.CheckpointManager` writes each checkpoint's
  files under temporary names and renames them into place, then replaces
  its state file (`checkpoint`, the list of complete checkpoints) in one
  atomic rename; the newest two are kept. A process killed at any instant
  leaves the list naming complete checkpoints only: the previous one, or the
  previous one and the new one. `restore` tries them newest first; one that
  cannot be read (a damaged disk, a file cut short by hand) is reported in
  one line and the previous one is used.
* **Preemption** (`PreemptionWatch`): TF's
  `tf.distribute.experimental.PreemptionCheckpointHandler` watches for
  SIGTERM; under `MultiWorkerMirroredStrategy` the workers agree (through
  the coordination service) on the step after which all of them save. Here
  its save is `RunCheckpoint.save` (the two-slot checkpoint above, not the
  handler's own single-checkpoint manager) and its exit raises `Preempted`,
  which `train_main.py` turns into one line and exit status
  `RESTART_EXIT_CODE` (42, the handler's own default: the code a cluster
  manager restarts on).
* **Lost workers**: a step that fails because a peer stopped answering
  (`PEER_ERRORS`) raises `PeerLost`, with the same exit status: restart all
  workers with `--resume`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Callable, List, Optional

import keras
import tensorflow as tf
from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import

RESTART_EXIT_CODE = 42   # PreemptionCheckpointHandler's default exit code
METADATA = "training_metadata.json"   # {"epoch": epochs done, "step": steps done}, for people
LEGACY_KERAS_FILES = ("latest.weights.h5", "latest.weights.h5.bkp")   # Keras BackupAndRestore's
# The errors of a collective step whose peer stopped answering (killed, hung
# or unreachable): the coordination service's heartbeat timeout, a broken
# gRPC channel, or the abort that the failed collective sends the others.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.AbortedError, tf.errors.CancelledError)


class Interrupted(Exception):
  """Training stopped early and can be restarted with `--resume` (exit status 42)."""
  exit_code = RESTART_EXIT_CODE


class Preempted(Interrupted):
  """A SIGTERM arrived; a checkpoint was saved at `step`."""

  def __init__(self, step: int, directory: Optional[str]):
    where = f" in {directory}" if directory else " (no --output_dir backup: not saved)"
    super().__init__(f"preempted (SIGTERM): checkpoint at step {step}{where}; restart with "
                     f"--resume to continue")
    self.step = step


class PeerLost(Interrupted):
  """A peer worker stopped answering during a collective step."""

  def __init__(self, error: Exception, step: int):
    # TF's message holds a stack of nodes and gRPC details around the cause
    # (e.g. "Collective ops is aborted by: ... Connection reset by peer").
    lines = [" ".join(l.split()) for l in str(getattr(error, "message", error)).splitlines()]
    lines = [l for l in lines if l and not l.startswith((
        "Graph execution error", "Detected at node", "File ", "[[", "Additional GRPC",
        ":UNKNOWN", "The error could be from"))]
    reason = lines[0] if lines else type(error).__name__
    super().__init__(f"lost contact with a peer worker at step {step} "
                     f"({type(error).__name__}: {reason[:200]}); restart every worker with "
                     f"--resume to continue from the last checkpoint")
    self.step = step
    self.error = error


class CheckpointError(ValueError):
  """No checkpoint in a folder could be loaded."""


def rng_state_variables(model: keras.Model) -> List[tf.Variable]:
  """The state variable of every `keras.random.SeedGenerator` of `model`'s layers
  (dropout), in a fixed order. Keras does not save them in weights files."""
  states, seen = [], set()
  for layer in model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    for generator in getattr(layer, "_seed_generators", ()):
      if id(generator.state) not in seen:
        seen.add(id(generator.state))
        states.append(generator.state)
  return states


def _number(prefix: str) -> int:
  match = re.search(r"ckpt-(\d+)$", prefix)
  return int(match.group(1)) if match else -1


def list_checkpoints(directory: Optional[str]) -> List[str]:
  """The complete checkpoints in `directory`, newest first (prefixes `.../ckpt-N`).

  The manager's state file names them; if it is missing or unreadable, every
  `ckpt-N` whose index file is there (an index is renamed into place last).
  """
  if not directory or not os.path.isdir(directory):
    return []
  prefixes = []
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (tf.errors.OpError, ValueError):   # a damaged state file: look at the files
    state = None
  if state is not None:
    for path in state.all_model_checkpoint_paths:
      path = path if os.path.isabs(path) else os.path.join(directory, path)
      if os.path.exists(path + ".index"):
        prefixes.append(path)
  if not prefixes:
    prefixes = [p[:-len(".index")] for p in glob.glob(os.path.join(directory, "ckpt-*.index"))]
  return sorted(set(prefixes), key=_number, reverse=True)


def find_checkpoint(directory: Optional[str]) -> Optional[str]:
  """The newest complete checkpoint in `directory` (a prefix), or None.

  Raises:
    CheckpointError: the folder holds only a Keras `BackupAndRestore` backup
      (`latest.weights.h5`, written by sparse_attention_tf 0.1), which holds
      no dropout state and which this version does not resume.
  """
  found = list_checkpoints(directory)
  if found:
    return found[0]
  if directory and any(os.path.exists(os.path.join(directory, n)) for n in LEGACY_KERAS_FILES):
    raise CheckpointError(
        f"{directory} holds a Keras BackupAndRestore backup (latest.weights.h5) of "
        f"sparse_attention_tf 0.1, which this version cannot resume: start over without "
        f"--resume, or finish that run with version 0.1.")
  return None


def remove_checkpoints(directory: Optional[str]) -> None:
  """Deletes every checkpoint file in `directory` (a run that starts over)."""
  if not directory or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if (name == "checkpoint" or name.startswith("ckpt-") or name.startswith(METADATA) or
        name.startswith(LEGACY_KERAS_FILES[0])):
      path = os.path.join(directory, name)
      if os.path.isdir(path):   # a `ckpt-N_temp` folder of a write that was killed
        tf.io.gfile.rmtree(path)
      else:
        os.remove(path)


def write_json_atomically(path: str, value) -> None:
  """Writes `value` as JSON to a temporary file, then renames it onto `path`."""
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(value, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class RunCheckpoint:
  """Model, optimizer, global step and dropout RNG state; two kept, crash-safe.

  Args:
    model: a built model.
    optimizer: its optimizer, built (`optimizer.build(model.trainable_variables)`).
    directory: where `save` writes (None: `save` does nothing).
    max_to_keep: checkpoints kept (2: the newest and a fallback).
  """

  def __init__(self, model: keras.Model, optimizer, directory: Optional[str],
               max_to_keep: int = 2):
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step,
                                          rng=rng_state_variables(model))
    self.directory = directory
    if directory and os.path.isdir(directory):   # what a write killed midway left
      for stale in glob.glob(os.path.join(directory, "ckpt-*_temp")):
        shutil.rmtree(stale, ignore_errors=True)
    self.manager = (tf.train.CheckpointManager(self.checkpoint, directory,
                                               max_to_keep=max_to_keep)
                    if directory else None)

  def save(self, step: int) -> Optional[str]:
    """Saves the state after `step` steps as `ckpt-<step>`; returns its prefix."""
    self.step.assign(step)
    if self.manager is None:
      return None
    return self.manager.save(checkpoint_number=step)

  def restore(self, directory: str, print_fn: Callable = print) -> str:
    """Restores the newest checkpoint of `directory` that loads; returns its prefix.

    A checkpoint that cannot be read is reported (one line through
    `print_fn`) and the next older one is tried.

    Raises:
      CheckpointError: none could be loaded (each one's error is named).
    """
    candidates = list_checkpoints(directory)
    errors = []
    for i, prefix in enumerate(candidates):
      try:
        status = self.checkpoint.restore(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()   # the manager's save counter is restored lazily
        return prefix
      except Exception as e:   # pylint: disable=broad-except
        # The reader's errors for damaged files vary: DataLossError,
        # IndexError ("Read less bytes than requested"), ValueError, ...
        reason = " ".join(str(getattr(e, "message", e)).split())[:200]
        errors.append(f"{os.path.basename(prefix)}: {reason}")
        fallback = (f"falling back to {os.path.basename(candidates[i + 1])}"
                    if i + 1 < len(candidates) else "no older checkpoint")
        print_fn(f"checkpoint {prefix} cannot be loaded ({type(e).__name__}: {reason}): "
                 f"{fallback}")
    raise CheckpointError(f"no checkpoint in {directory} can be loaded"
                          + (f" ({'; '.join(errors)})" if errors else "") +
                          ": start over without --resume.")


class PreemptionWatch:
  """SIGTERM handling for a training loop, on TF's `PreemptionCheckpointHandler`.

  The handler's own checkpoint is an empty one in a scratch folder (so every
  worker starts with the same run count, 0); its save is `save_fn` (the
  two-slot `RunCheckpoint`), and its exit raises `Preempted`. Call `run`
  for each step of a custom loop, or `check` after each step of `fit`;
  `close` restores the previous SIGTERM handler. Outside the main thread
  (where Python cannot set signal handlers) it watches nothing.

  Args:
    strategy: the loop's strategy (its cluster resolver, if multi-worker).
    save_fn: saves a checkpoint of the current step; returns the step.
    directory: where the checkpoint goes (for the message).
  """

  def __init__(self, strategy: Optional[tf.distribute.Strategy], save_fn: Callable[[], int],
               directory: Optional[str]):
    self._save_fn = save_fn
    self._saved_step = None
    self._directory = directory
    self.handler = None
    if threading.current_thread() is not threading.main_thread():
      return   # signal handlers can only be set there: no preemption handling
    self._previous = signal.getsignal(signal.SIGTERM)
    self._scratch = tempfile.mkdtemp(prefix="sparse_attention_tf_preemption_")
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and not resolver.cluster_spec().jobs:
      resolver = None
    config = tf.distribute.experimental.TerminationConfig(save_fn=self._save, exit_fn=self._exit)
    self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        resolver, tf.train.Checkpoint(), checkpoint_dir=os.path.join(self._scratch, "unused"),
        termination_config=config)

  def _save(self):
    self._saved_step = self._save_fn()

  def _exit(self):
    raise Preempted(self._saved_step, self._directory)

  def run(self, step_fn, *args):
    """Runs one training step (checking for a preemption first)."""
    if self.handler is None:
      return step_fn(*args)
    with deprecation.silence():   # the handler reads its own deprecated run count
      return self.handler.run(step_fn, *args)

  def check(self) -> None:
    """After a step of `fit`: saves and raises `Preempted` once a SIGTERM is due."""
    if self.handler is not None:
      with deprecation.silence():
        self.handler.save_checkpoint_if_preempted()

  def close(self) -> None:
    if self.handler is not None:
      signal.signal(signal.SIGTERM, self._previous)
      shutil.rmtree(self._scratch, ignore_errors=True)
