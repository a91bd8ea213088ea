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
  `Model.fit` with `BackupAndRestore` (weights, optimizer state and epoch,
  after every epoch) and Keras's TensorBoard callback.
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
  scaling). Checkpoints (`tf.train.CheckpointManager`: model, optimizer, step
  counter) are saved after every epoch by every worker: the chief into
  `backup_dir`, the others into temporary folders they delete again (the
  usual multi-worker pattern). `resume` restores the chief's checkpoint on
  every worker, so `backup_dir` must be on a file system all workers see.

A resumed run (`resume=True`) restores the checkpoint in `backup_dir` and
skips the batches already trained on, so it continues at the same step and
data position; a run that is not resumed replaces the checkpoint. The two
loops write different checkpoint formats (`find_checkpoint` tells which) and
cannot resume each other's.

TensorBoard (the chief, in `log_dir`): `train/` and `validation/` hold
`epoch_loss` and `epoch_<unit>` after every epoch (step: the epoch index;
`train/` also `epoch_learning_rate`), and `train/` holds `batch_loss`,
`batch_<unit>` and `batch_learning_rate` every `log_every_steps` steps (step:
the global training step, continued by a resumed run; value: the mean over
the steps since the previous point, and the learning rate after the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import keras
import tensorflow as tf

from sparse_attention_tf.metrics import BitsPerToken

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN
METADATA = "training_metadata.json"   # {"epoch": epochs done, ...}; both loops write it
KERAS_BACKUP_FILES = ("latest.weights.h5", METADATA)   # what BackupAndRestore writes (+ .bkp)


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


def find_checkpoint(backup_dir: Optional[str]) -> Optional[str]:
  """Which loop wrote the checkpoint in `backup_dir`: "fit", "distributed_fit" or None."""
  if not backup_dir or not os.path.isdir(backup_dir):
    return None
  if tf.train.latest_checkpoint(backup_dir):
    return "distributed_fit"
  if os.path.exists(os.path.join(backup_dir, KERAS_BACKUP_FILES[0])):
    return "fit"
  return None


def _check_resumable(config: TrainConfig, loop: str) -> Optional[str]:
  """The checkpoint `loop` restores (None: none, start fresh); raises if the other loop
  wrote it."""
  found = find_checkpoint(config.backup_dir) if config.resume else None
  if found not in (None, loop):
    raise ValueError(f"the checkpoint in {config.backup_dir} was written by {found}, which "
                     f"{loop} cannot restore (fit: the default and mirrored strategies; "
                     f"distributed_fit: multi_worker).")
  return found


def _remove_checkpoint(backup_dir: str) -> None:
  """Deletes both loops' checkpoint files in `backup_dir` (a run that starts over)."""
  if not os.path.isdir(backup_dir):
    return
  for name in os.listdir(backup_dir):
    if (name.startswith(KERAS_BACKUP_FILES) or name == "checkpoint" or
        name.startswith("ckpt-")):
      os.remove(os.path.join(backup_dir, name))


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
  """Step bookkeeping inside `fit`: per-step TensorBoard points, the learning rate in
  the epoch logs, and the end of training at `steps` or after `stop_after_epochs`.

  Keras's batch logs hold the running means of the epoch so far, so the sum of
  the first k steps of an epoch is k times the mean after step k: the mean of
  the steps since the previous point is a difference of two such sums. The
  global step is `epoch * steps_per_epoch + batch + 1` (a resumed `fit` starts
  at the restored epoch), so points continue across a resume.
  """

  def __init__(self, config: TrainConfig):
    super().__init__()
    self.config = config
    self.scalars = _StepScalars(config.log_dir, config.unit) if config.log_dir else None
    self.epochs_left = config.stop_after_epochs
    self.epoch = 0
    self.counted = (0.0, 0.0, 0)        # (loss sum, unit sum, steps) of this epoch, written

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch
    self.counted = (0.0, 0.0, 0)

  def on_train_batch_end(self, batch, logs=None):
    config = self.config
    step = self.epoch * config.steps_per_epoch + batch + 1
    if step >= config.steps:
      self.model.stop_training = True     # a shorter last epoch ends at `steps`
    last_of_epoch = batch + 1 == config.steps_per_epoch or step >= config.steps
    if self.scalars is None or not (step % config.log_every_steps == 0 or last_of_epoch):
      return
    k = batch + 1                              # steps of this epoch so far
    loss_sum, unit_sum = k * float(logs["loss"]), k * float(logs[config.unit])
    done_loss, done_unit, done = self.counted
    self.scalars.add(loss_sum - done_loss, unit_sum - done_unit, k - done)
    self.counted = (loss_sum, unit_sum, k)
    if step % config.log_every_steps == 0:
      self.scalars.write(step, _learning_rate(self.model.optimizer))

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs["learning_rate"] = _learning_rate(self.model.optimizer)
    if self.epochs_left is not None:
      self.epochs_left -= 1
      if self.epochs_left <= 0:
        self.model.stop_training = True

  def on_train_end(self, logs=None):
    if self.scalars is not None:
      self.scalars.close()


def fit(model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
        config: TrainConfig) -> dict:
  """Trains a compiled `model` with Keras `fit` (default or mirrored strategy).

  Args:
    model: a built model compiled by `compile_model` (under the strategy's
      scope for mirrored).
    train_ds: endless dataset of global batches `(x, y)`, not yet advanced: a
      resumed run skips the steps already done.
    val_ds: validation batches `(x, y)`, at least `config.validation_steps`.
    config: the run (`verbose` sets Keras's progress output).

  Returns:
    dict: `history` (per-epoch lists: `loss`, the unit, `val_loss`,
    `val_<unit>`, `learning_rate`), `validation` (a final evaluation: `loss`
    and the unit), `steps_done`, `train_seconds`.
  """
  start_epoch = 0    # BackupAndRestore restores the epoch; skip the batches it trained on
  if _check_resumable(config, "fit"):
    metadata = os.path.join(config.backup_dir, METADATA)
    if os.path.exists(metadata):
      with open(metadata) as f:
        start_epoch = int(json.load(f)["epoch"])
  elif config.backup_dir:
    _remove_checkpoint(config.backup_dir)
  callbacks = []
  if config.backup_dir:   # first: it restores the model before the others start
    callbacks.append(keras.callbacks.BackupAndRestore(config.backup_dir, save_freq="epoch",
                                                      delete_checkpoint=False))
  callbacks.append(_FitControl(config))
  if config.log_dir:
    callbacks.append(keras.callbacks.TensorBoard(config.log_dir, update_freq="epoch"))
  start = time.time()
  history = model.fit(train_ds.skip(start_epoch * config.steps_per_epoch), epochs=config.epochs,
                      steps_per_epoch=config.steps_per_epoch, validation_data=val_ds,
                      validation_steps=config.validation_steps, callbacks=callbacks,
                      verbose=config.verbose,
                      shuffle=False)   # the dataset is shuffled, deterministically
  train_seconds = time.time() - start
  final = model.evaluate(val_ds, steps=config.validation_steps, return_dict=True, verbose=0)
  return {"history": history.history, "validation": final,
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
  with strategy.scope():
    if not optimizer.built:
      optimizer.build(variables)        # before restoring: no deferred restoration
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

  write_dir, temporary = config.backup_dir, False
  if not chief:
    task = strategy.cluster_resolver.task_id
    write_dir, temporary = tempfile.mkdtemp(prefix=f"train_worker{task}_backup_"), True
  scalars, writers = None, {}
  try:
    found = _check_resumable(config, "distributed_fit")
    if chief and config.backup_dir:
      if not found:
        _remove_checkpoint(config.backup_dir)
      os.makedirs(config.backup_dir, exist_ok=True)
    manager = (tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=1)
               if write_dir else None)
    if found:
      checkpoint.restore(tf.train.latest_checkpoint(config.backup_dir)
                         ).assert_existing_objects_matched()
    _check_same_step(strategy, step)
    start_step = int(step.numpy())

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
    while int(step.numpy()) < config.steps:
      first = int(step.numpy())
      epoch = first // config.steps_per_epoch
      count = min(config.steps_per_epoch, config.steps - first)
      epoch_start = time.time()
      total = tf.constant(0.0)
      for i in range(count):
        loss = train_step(iterator)
        total += loss
        step.assign_add(1)
        if scalars is not None:
          window, window_steps = window + loss, window_steps + 1
          if (first + i + 1) % config.log_every_steps == 0:
            nats = float(window)
            scalars.add(nats, nats / math.log(2.0), window_steps)
            scalars.write(first + i + 1, _learning_rate(optimizer))
            window, window_steps = tf.constant(0.0), 0
      loss = float(total) / count
      seconds = time.time() - epoch_start
      val = evaluate()
      logs = {unit: loss / math.log(2.0), "loss": loss, f"val_{unit}": val[unit],
              "val_loss": val["loss"], "learning_rate": _learning_rate(optimizer)}
      for name, value in logs.items():
        history[name].append(value)

      if manager:
        manager.save(checkpoint_number=step)     # every worker (collective-safe)
      if temporary:
        shutil.rmtree(write_dir, ignore_errors=True)
      if chief:
        if config.backup_dir:
          with open(os.path.join(config.backup_dir, METADATA), "w") as f:
            json.dump({"epoch": epoch + 1, "step": int(step.numpy())}, f)
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
    return {"history": {k: v for k, v in history.items() if v}, "validation": final,
            "steps_done": int(step.numpy()), "train_seconds": train_seconds}
  finally:
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
