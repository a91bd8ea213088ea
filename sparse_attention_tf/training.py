"""Training loops for a compiled language model: Keras `fit` and a tf.distribute custom loop.

    config = TrainConfig(steps=1200, unit=data.unit, backup_dir="run/backup",
                         log_dir="run/logs")
    with strategy.scope():
      model = SparseTransformer(...)
      compile_model(model, config)
    result = fit(model, train_ds, val_ds, config)                     # default, mirrored
    result = distributed_fit(strategy, model, train_ds, val_ds, config)   # multi_worker

Both loops read one `TrainConfig` and return the same summary (`history`,
`validation`, `steps_done`, `train_seconds`); `train_main.py` drives them
from its flags.

* `fit` (the `default` and `MirroredStrategy` strategies) is Keras
  `Model.fit` with a checkpoint after every epoch (and every
  `save_every_steps` steps) and Keras's TensorBoard callback.
* `distributed_fit` (`MultiWorkerMirroredStrategy`): Keras 3.15's `fit` fails
  there (keras-team/keras#20585: its symbolic build reduces a *tuple* of
  `PerReplica` batches, which the collective cross-device ops cannot
  convert), so this loop trains the same compiled model with tf.distribute
  directly. The global batches are split among all replicas of all workers
  by `strategy.experimental_distribute_dataset` (DATA sharding: every worker
  reads the same seeded stream and keeps its part of each batch), so a step
  sees the same examples as a `fit` step. One `tf.function` step runs
  `strategy.run` on every replica: the token-mean cross-entropy scaled by the
  global batch (`tf.nn.compute_average_loss`), then
  `optimizer.apply_gradients`, which does what it does in `fit`: clips each
  replica's gradient by global norm, sums the gradients of all replicas of
  all workers (a collective all-reduce) and applies AdamW with the schedule
  (and, under mixed_float16, the `LossScaleOptimizer`'s dynamic loss
  scaling). Every worker saves the checkpoints (saving is collective-safe
  that way): the chief into `backup_dir`, the others into temporary folders
  they delete again (the usual multi-worker pattern). `resume` restores the
  chief's checkpoint on every worker, so `backup_dir` must be on a file
  system all workers see.

Checkpoints (`checkpointing.RunCheckpoint`, the same format for both loops,
so a run may resume under another strategy): model, optimizer, global step
and the dropout RNG state, after every epoch and every `save_every_steps`
steps; written crash-safe, the newest two kept, a damaged newest one skipped
for the previous one on resume. A resumed run (`resume=True`) restores the
checkpoint in `backup_dir` and skips the batches already trained on, so it
continues at the same step, data position and dropout masks, also from a
checkpoint taken mid-epoch; a run that is not resumed replaces the
checkpoint.

Preemption and lost workers (`checkpointing`): a SIGTERM saves a checkpoint
(under multi_worker, all workers at the same step) and raises `Preempted`;
a peer worker that stops answering raises `PeerLost`. Both are
`checkpointing.Interrupted`: restart with `resume=True`.

TensorBoard (the chief, in `log_dir`): `train/` and `validation/` hold
`epoch_loss` and `epoch_<unit>` after every epoch (step: the epoch index;
`train/` also `epoch_learning_rate`), and `train/` holds `batch_loss`,
`batch_<unit>` and `batch_learning_rate` every `log_every_steps` steps (step:
the global training step, continued by a resumed run; value: the mean over
the steps since the previous point, and the learning rate after the step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import keras
import tensorflow as tf

from sparse_attention_tf import checkpointing
# Interrupted, Preempted and find_checkpoint are also this module's API (train_main.py).
from sparse_attention_tf.checkpointing import (METADATA, Interrupted, PeerLost, Preempted,
                                               RunCheckpoint, find_checkpoint)
from sparse_attention_tf.metrics import BitsPerToken

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN


@dataclasses.dataclass
class TrainConfig:
  """How to train: optimizer and schedule, the loop, checkpoints and logs.

  One object for `compile_model`, `fit` and `distributed_fit`; the defaults
  are `train_main.py`'s (its flags of the same names), each with its reason.
  """
  # --- optimizer and schedule
  steps: int = 1200                  # a few minutes of the default model on 2 CPU cores
  batch_size: int = 16               # global batch (all replicas): 4096 tokens of 256 a step
  learning_rate: float = 2e-3        # peak; a small model takes a high rate after warm-up
  warmup_steps: int = 50             # linear warm-up while Adam's moment estimates settle
  weight_decay: float = 0.01         # AdamW's usual mild decay
  clipnorm: float = 1.0              # global-norm clipping keeps early spikes harmless
  # --- the loop
  steps_per_epoch: int = 200         # a validation and a checkpoint every 200 steps
  validation_steps: int = 10         # 160 sequences: a stable estimate in seconds
  stop_after_epochs: Optional[int] = None  # end early as if interrupted (tests of resume)
  save_every_steps: Optional[int] = None   # also checkpoint every N steps (None: per epoch)
  verbose: int = 1                   # Keras progress bars; the custom loop: a line per epoch
  # --- checkpoints and logs
  backup_dir: Optional[str] = None   # the checkpoint's folder (None: no checkpoints)
  resume: bool = False               # continue from backup_dir's checkpoint, if there is one
  log_dir: Optional[str] = None      # TensorBoard folder (None: no logs)
  log_every_steps: int = 50          # points between epochs: 24 over the default 1200 steps
  unit: str = "bits_per_byte"        # the bits metric's name: `TokenData.unit` of the data

  def __post_init__(self):
    for name in ("steps", "batch_size", "steps_per_epoch", "validation_steps",
                 "log_every_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.save_every_steps is not None and self.save_every_steps < 1:
      raise ValueError(f"save_every_steps must be >= 1, got {self.save_every_steps}.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
    if self.resume and not self.backup_dir:
      raise ValueError("resume needs a backup_dir to resume from.")

  @property
  def epochs(self) -> int:
    """Epochs of `steps_per_epoch` steps up to `steps` (the last one may be shorter)."""
    return -(-self.steps // self.steps_per_epoch)


# ---------------------------------------------------------------------------
# Optimizer, checkpoints, logs: shared by both loops


def learning_rate_schedule(config: TrainConfig):
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 at `steps`."""
  return keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0, decay_steps=max(1, config.steps - config.warmup_steps),
      warmup_target=config.learning_rate, warmup_steps=config.warmup_steps)


def compile_model(model: keras.Model, config: TrainConfig) -> None:
  """Compiles a language model for either loop (call it in the strategy's scope).

  AdamW with `learning_rate_schedule`, `weight_decay` and global-norm
  clipping at `clipnorm`; next-token cross-entropy on logits; and the
  `BitsPerToken` metric named `config.unit`.
  """
  optimizer = keras.optimizers.AdamW(learning_rate=learning_rate_schedule(config),
                                     weight_decay=config.weight_decay,
                                     global_clipnorm=config.clipnorm)
  model.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[BitsPerToken(name=config.unit)])


def _restore(model: keras.Model, config: TrainConfig, directory: Optional[str],
             print_fn: Callable) -> RunCheckpoint:
  """The run's checkpoint object, restored from `config.backup_dir` when resuming (the
  newest loadable checkpoint); a run that does not resume removes the old one.
  `directory` is where this process saves (None: it does not)."""
  optimizer = model.optimizer
  if not optimizer.built:     # before restoring: no deferred restoration
    with model.distribute_strategy.scope():
      optimizer.build(model.trainable_variables)
  resuming = config.resume and find_checkpoint(config.backup_dir)
  if directory and not resuming:
    checkpointing.remove_checkpoints(directory)
  if directory:
    os.makedirs(directory, exist_ok=True)
  checkpoint = RunCheckpoint(model, optimizer, directory)   # after the removal: its list
  if resuming:
    checkpoint.restore(config.backup_dir, print_fn)
  return checkpoint


def _write_metadata(config: TrainConfig, step: int) -> None:
  checkpointing.write_json_atomically(os.path.join(config.backup_dir, METADATA),
                                      {"epoch": step // config.steps_per_epoch, "step": step})


def _learning_rate(optimizer) -> float:
  """The optimizer's current learning rate (its schedule at its iterations)."""
  return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class _StepScalars:
  """The per-step TensorBoard points: means of the steps since the previous point."""

  def __init__(self, log_dir: str, unit: str):
    self.unit = unit
    self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    self.loss_sum, self.unit_sum, self.count = 0.0, 0.0, 0

  def add(self, loss_sum: float, unit_sum: float, count: int) -> None:
    """Counts `count` more steps whose losses (nats) and bits per token sum to these."""
    self.loss_sum += loss_sum
    self.unit_sum += unit_sum
    self.count += count

  def write(self, step: int, learning_rate: float) -> None:
    """Writes the means of the steps added since the last point, at global `step`."""
    if self.count:
      with self.writer.as_default():
        tf.summary.scalar("batch_loss", self.loss_sum / self.count, step=step)
        tf.summary.scalar(f"batch_{self.unit}", self.unit_sum / self.count, step=step)
        tf.summary.scalar("batch_learning_rate", learning_rate, step=step)
      self.writer.flush()
    self.loss_sum, self.unit_sum, self.count = 0.0, 0.0, 0

  def close(self) -> None:
    self.writer.close()


# ---------------------------------------------------------------------------
# Keras fit: the default and mirrored strategies


class _FitControl(keras.callbacks.Callback):
  """Step bookkeeping inside `fit`: checkpoints (after every epoch and every
  `save_every_steps` steps), SIGTERM (a checkpoint, then `Preempted`),
  per-step TensorBoard points, the learning rate in the epoch logs, and the
  end of training at `steps` or after `stop_after_epochs`.

  The global step is the optimizer's iteration count at the start of the
  epoch plus the batches since (a resumed `fit` may start mid-epoch), so
  checkpoints and points continue across a resume. Keras's batch logs hold
  the running means of the epoch so far, so the sum of the first k steps of
  an epoch is k times the mean after step k: the mean of the steps since the
  previous point is a difference of two such sums.
  """

  def __init__(self, config: TrainConfig, checkpoint: RunCheckpoint,
               preemption: Optional[checkpointing.PreemptionWatch]):
    super().__init__()
    self.config = config
    self.checkpoint = checkpoint
    self.preemption = preemption
    self.scalars = _StepScalars(config.log_dir, config.unit) if config.log_dir else None
    self.epochs_left = config.stop_after_epochs
    self.stopped = False                # stop_after_epochs or steps reached: no more fit calls
    self.epoch_start = 0                # global step at the start of this epoch
    self.step = 0                       # global steps done
    self.saved = -1                     # the step of the last checkpoint
    self.counted = (0.0, 0.0, 0)        # (loss sum, unit sum, steps) of this epoch, written

  def save(self) -> int:
    if self.saved != self.step:
      self.checkpoint.save(self.step)
      if self.checkpoint.directory:
        _write_metadata(self.config, self.step)
      self.saved = self.step
    return self.step

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch_start = self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
    self.counted = (0.0, 0.0, 0)

  def on_train_batch_end(self, batch, logs=None):
    config = self.config
    step = self.step = self.epoch_start + batch + 1
    if step >= config.steps:
      self.model.stop_training = self.stopped = True    # a shorter last epoch ends at `steps`
    if config.save_every_steps and step % config.save_every_steps == 0:
      self.save()
    if self.preemption is not None:
      self.preemption.check()           # after a SIGTERM: save, raise Preempted
    last_of_epoch = step % config.steps_per_epoch == 0 or step >= config.steps
    if self.scalars is None or not (step % config.log_every_steps == 0 or last_of_epoch):
      return
    k = batch + 1                              # steps of this fit epoch so far
    loss_sum, unit_sum = k * float(logs["loss"]), k * float(logs[config.unit])
    done_loss, done_unit, done = self.counted
    self.scalars.add(loss_sum - done_loss, unit_sum - done_unit, k - done)
    self.counted = (loss_sum, unit_sum, k)
    if step % config.log_every_steps == 0:
      self.scalars.write(step, _learning_rate(self.model.optimizer))

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs["learning_rate"] = _learning_rate(self.model.optimizer)
    self.save()
    if self.epochs_left is not None:
      self.epochs_left -= 1
      if self.epochs_left <= 0:
        self.model.stop_training = self.stopped = True

  def close(self):
    if self.scalars is not None:
      self.scalars.close()


def fit(model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
        config: TrainConfig, print_fn: Callable = print) -> dict:
  """Trains a compiled `model` with Keras `fit` (default or mirrored strategy).

  Args:
    model: a built model compiled by `compile_model` (under the strategy's
      scope for mirrored).
    train_ds: endless dataset of global batches `(x, y)`, not yet advanced: a
      resumed run skips the steps already done.
    val_ds: validation batches `(x, y)`, at least `config.validation_steps`.
    config: the run (`verbose` sets Keras's progress output).
    print_fn: where a resume that skips a damaged checkpoint says so.

  Returns:
    dict: `history` (per-epoch lists: `loss`, the unit, `val_loss`,
    `val_<unit>`, `learning_rate`), `validation` (a final evaluation: `loss`
    and the unit), `steps_done`, `train_seconds`.

  Raises:
    checkpointing.Preempted: a SIGTERM arrived (a checkpoint was saved first).
  """
  checkpoint = _restore(model, config, config.backup_dir, print_fn)
  start_step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
  preemption = checkpointing.PreemptionWatch(None, lambda: control.save(), config.backup_dir)
  control = _FitControl(config, checkpoint, preemption)
  callbacks = [control]
  if config.log_dir:
    callbacks.append(keras.callbacks.TensorBoard(config.log_dir, update_freq="epoch"))
  # Keras epochs have one length per `fit` call: a run resumed mid-epoch first
  # finishes that epoch in a call of its own.
  spe = config.steps_per_epoch
  epoch, done_in_epoch = divmod(start_step, spe)
  calls = []   # (initial_epoch, epochs, steps_per_epoch, first step)
  if done_in_epoch and epoch < config.epochs:
    calls.append((epoch, epoch + 1, spe - done_in_epoch, start_step))
    epoch += 1
  if epoch < config.epochs:
    calls.append((epoch, config.epochs, spe, epoch * spe))
  history = {}
  start = time.time()
  try:
    for initial_epoch, epochs, steps_per_epoch, first in calls:
      if control.stopped:
        break
      run = model.fit(train_ds.skip(first), initial_epoch=initial_epoch, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, validation_data=val_ds,
                      validation_steps=config.validation_steps, callbacks=callbacks,
                      verbose=config.verbose,
                      shuffle=False)   # the dataset is shuffled, deterministically
      for name, values in run.history.items():
        history.setdefault(name, []).extend(values)
  finally:
    preemption.close()
    control.close()
  train_seconds = time.time() - start
  final = model.evaluate(val_ds, steps=config.validation_steps, return_dict=True, verbose=0)
  return {"history": history, "validation": final,
          "steps_done": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
          "train_seconds": train_seconds}


# ---------------------------------------------------------------------------
# The custom loop: MultiWorkerMirroredStrategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process is the chief: no cluster, a "chief" task, or worker 0."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (resolver.task_type == "worker" and
                                           resolver.task_id == 0)


def _format_logs(logs: dict) -> str:
  """Keras's progress-bar formatting of epoch logs: ` - name: value` each."""
  parts = []
  for name, value in logs.items():
    parts.append(f"{name}: {value:.4f}" if abs(value) > 1e-3 else f"{name}: {value:.4e}")
  return " - ".join(parts)


def _per_step(seconds: float) -> str:
  """Keras's time per step: `2s/step`, `69ms/step`, `850us/step`."""
  if seconds >= 1:
    return f"{seconds:.0f}s/step"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.0f}ms/step"
  return f"{seconds * 1e6:.0f}us/step"


def _distribute(strategy, dataset):
  options = tf.data.Options()
  # The datasets are not read from files: split each global batch among the
  # workers (every worker reads the same seeded stream) instead of trying to
  # split files first.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return strategy.experimental_distribute_dataset(dataset.with_options(options))


def distributed_fit(strategy: tf.distribute.Strategy, model: keras.Model,
                    train_ds: tf.data.Dataset, val_ds: tf.data.Dataset, config: TrainConfig,
                    print_fn: Callable = print) -> dict:
  """Trains a compiled `model` under `strategy` with a custom loop.

  Every worker calls this with the same arguments (the steps are collective).

  Args:
    strategy: the strategy whose scope built and compiled `model`.
    model: a built model compiled by `compile_model` (`model.optimizer` is
      used; its gradient clipping and loss scaling apply).
    train_ds: endless dataset of global batches `(x, y)`, not yet advanced: a
      resumed run skips the steps already done.
    val_ds: validation batches `(x, y)`, at least `config.validation_steps`.
    config: the run; `backup_dir` is the chief's (restored from by every
      worker with `resume`), and only the chief writes `log_dir`.
    print_fn: where the chief's line per epoch goes (with `config.verbose`).

  Returns:
    dict: `history` (per-epoch lists, keys as in `fit`), `validation` (final
    evaluation: `loss` and the unit), `steps_done`, `train_seconds`.
  """
  chief = is_chief(strategy)
  unit = config.unit
  optimizer = model.optimizer
  variables = model.trainable_variables

  write_dir, temporary = config.backup_dir, False
  if not chief and config.backup_dir:
    task = strategy.cluster_resolver.task_id
    write_dir, temporary = tempfile.mkdtemp(prefix=f"train_worker{task}_backup_"), True
  scalars, writers, preemption = None, {}, None
  try:
    checkpoint = _restore(model, config, write_dir, print_fn if chief else lambda line: None)
    step = checkpoint.step
    _check_same_step(strategy, step)
    start_step = int(step.numpy())

    def save() -> int:
      """A checkpoint of the current step (every worker: collective-safe)."""
      done = int(step.numpy())
      checkpoint.save(done)
      if temporary:   # only the chief's is kept
        checkpointing.remove_checkpoints(write_dir)
      if chief and config.backup_dir:
        _write_metadata(config, done)
      return done

    preemption = checkpointing.PreemptionWatch(strategy, save, config.backup_dir)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_train_step(x, y):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = tf.reduce_mean(loss_fn(y, logits), axis=-1)          # (b,) nats
        loss = tf.nn.compute_average_loss(per_example,
                                          global_batch_size=config.batch_size)
        if model.losses:
          loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        scaled = optimizer.scale_loss(loss)         # mixed_float16: dynamic loss scale
      grads = tape.gradient(scaled, variables)
      optimizer.apply_gradients(zip(grads, variables))    # clip, all-reduce, AdamW
      return loss

    @tf.function
    def train_step(iterator):
      x, y = next(iterator)
      return strategy.reduce(SUM, strategy.run(replica_train_step, args=(x, y)), axis=None)

    def replica_eval_step(x, y):
      nats = loss_fn(y, model(x, training=False))
      return tf.reduce_sum(nats), tf.cast(tf.size(nats), tf.float32)

    @tf.function
    def eval_step(iterator):
      x, y = next(iterator)
      total, count = strategy.run(replica_eval_step, args=(x, y))
      return strategy.reduce(SUM, total, axis=None), strategy.reduce(SUM, count, axis=None)

    val_dist = _distribute(strategy, val_ds)

    def evaluate():
      iterator = iter(val_dist)
      total = count = 0.0
      for _ in range(config.validation_steps):
        t, c = eval_step(iterator)
        total, count = total + float(t), count + float(c)
      loss = total / max(count, 1.0)
      return {"loss": loss, unit: loss / math.log(2.0)}

    if chief and config.log_dir:
      scalars = _StepScalars(config.log_dir, config.unit)
      writers = {"train": scalars.writer, "validation": tf.summary.create_file_writer(
          os.path.join(config.log_dir, "validation"))}
    history = {unit: [], "loss": [], f"val_{unit}": [], "val_loss": [], "learning_rate": []}
    iterator = iter(_distribute(strategy, train_ds.skip(start_step)))
    window, window_steps = tf.constant(0.0), 0    # losses since the last TensorBoard point
    epochs_run = 0
    start = time.time()
    try:
      while int(step.numpy()) < config.steps:
        first = int(step.numpy())
        epoch = first // config.steps_per_epoch
        # To the end of this epoch (a run resumed mid-epoch finishes it first).
        count = min(config.steps_per_epoch * (epoch + 1), config.steps) - first
        epoch_start = time.time()
        total = tf.constant(0.0)
        for i in range(count):
          loss = preemption.run(train_step, iterator)   # after a SIGTERM: save, Preempted
          total += loss
          step.assign_add(1)
          done = first + i + 1
          if config.save_every_steps and done % config.save_every_steps == 0:
            save()
          if scalars is not None:
            window, window_steps = window + loss, window_steps + 1
            if done % config.log_every_steps == 0:
              nats = float(window)
              scalars.add(nats, nats / math.log(2.0), window_steps)
              scalars.write(done, _learning_rate(optimizer))
              window, window_steps = tf.constant(0.0), 0
        loss = float(total) / count
        seconds = time.time() - epoch_start
        val = evaluate()
        logs = {unit: loss / math.log(2.0), "loss": loss, f"val_{unit}": val[unit],
                "val_loss": val["loss"], "learning_rate": _learning_rate(optimizer)}
        for name, value in logs.items():
          history[name].append(value)
        if write_dir and (not config.save_every_steps or
                          int(step.numpy()) % config.save_every_steps):
          save()
        if chief:
          for name, writer in writers.items():
            prefix = "val_" if name == "validation" else ""
            with writer.as_default():
              for key in ("loss", unit) + (("learning_rate",) if name == "train" else ()):
                tf.summary.scalar(f"epoch_{key}", logs[prefix + key], step=epoch)
            writer.flush()
          if config.verbose:
            print_fn(f"Epoch {epoch + 1}/{config.epochs}\n{count}/{count} - {seconds:.0f}s - "
                     f"{_per_step(seconds / count)} - {_format_logs(logs)}")
        epochs_run += 1
        if config.stop_after_epochs and epochs_run >= config.stop_after_epochs:
          break
      train_seconds = time.time() - start
      final = evaluate()
    except checkpointing.PEER_ERRORS as e:
      raise PeerLost(e, int(step.numpy())) from None
    return {"history": {k: v for k, v in history.items() if v}, "validation": final,
            "steps_done": int(step.numpy()), "train_seconds": train_seconds}
  finally:
    if preemption is not None:
      preemption.close()
    if temporary:
      shutil.rmtree(write_dir, ignore_errors=True)
    for writer in writers.values():
      writer.close()


def _check_same_step(strategy, step):
  """Raises on every worker if the workers restored different step counters (e.g. a
  worker that cannot see the chief's checkpoint directory): they would otherwise
  run different numbers of collective steps and hang."""
  value = tf.cast(step, tf.float32)

  @tf.function
  def spread():
    def fn():
      ctx = tf.distribute.get_replica_context()
      mean = ctx.all_reduce(MEAN, value)
      return ctx.all_reduce(SUM, tf.abs(value - mean))
    return strategy.experimental_local_results(strategy.run(fn))[0]

  if float(spread()) > 0:
    raise ValueError(f"the workers restored different steps (this one: {int(step.numpy())}); "
                     f"all workers must see the chief's checkpoint directory.")
