"""A custom distributed training loop (used by `train_main.py --strategy=multi_worker`).

Keras 3.15's `Model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585: its symbolic build reduces a *tuple* of `PerReplica`
batches, which the collective cross-device ops cannot convert). This loop
trains the same compiled model with tf.distribute directly:

* the global batches of the tf.data pipeline are split among all replicas of
  all workers by `strategy.experimental_distribute_dataset` (DATA sharding:
  every worker reads the same seeded stream and keeps its part of each batch),
  so a step sees the same examples as one step of the `default` strategy;
* one `tf.function` step runs `strategy.run` on every replica: the loss is
  the token-mean cross-entropy scaled by the global batch
  (`tf.nn.compute_average_loss`), and `optimizer.apply_gradients` does what
  it does in `fit`'s `Model.train_step`: clips each replica's gradient by
  global norm, sums the gradients of all replicas of all workers (a
  collective all-reduce) and applies AdamW with the schedule (and, under
  mixed_float16, the compiled `LossScaleOptimizer`'s dynamic loss scaling);
* checkpoints (`tf.train.CheckpointManager`: model, optimizer, step counter)
  after every epoch, saved by every worker: the chief into the real
  directory, the others into a temporary directory they delete again (the
  usual `MultiWorkerMirroredStrategy` pattern); `resume` restores the latest
  checkpoint of the real directory on every worker (so it must be on a file
  system all workers see) and continues the step counter and data position.

The returned history has the keys of `fit`'s (`loss`, the unit, `val_loss`,
`val_<unit>`, `learning_rate`); the chief prints one line per epoch in the
format of Keras's `verbose=2` and writes TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import keras
import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN


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


def distributed_fit(strategy: tf.distribute.Strategy, model: keras.Model, train_ds: tf.data.Dataset,
                    val_ds: tf.data.Dataset, *, steps: int, steps_per_epoch: int,
                    validation_steps: int, global_batch_size: int, backup_dir: str,
                    log_dir: Optional[str], unit: str = "bits_per_byte",
                    learning_rate: Optional[Callable] = None, resume: bool = False,
                    stop_after_epochs: Optional[int] = None, verbose: int = 1,
                    print_fn: Callable = print) -> dict:
  """Trains a compiled `model` under `strategy` with a custom loop.

  Every worker calls this with the same arguments (the steps are collective).

  Args:
    strategy: the strategy whose scope built and compiled `model`.
    model: a built, compiled language model (`model.optimizer` is used; its
      gradient clipping and loss scaling apply).
    train_ds: endless dataset of global batches `(x, y)`, not yet advanced: a
      resumed run skips the steps already done.
    val_ds: validation batches `(x, y)`, at least `validation_steps` of them.
    steps: total training steps (the last epoch may be shorter).
    steps_per_epoch: steps between validations and checkpoints.
    validation_steps: validation batches per evaluation.
    global_batch_size: examples per global batch (all replicas together).
    backup_dir: the chief's checkpoint directory (restored from by every
      worker with `resume`).
    log_dir: TensorBoard folder (the chief writes `train/` and `validation/`
      in it); None: none.
    unit: name of the bits-per-token metric (`bits_per_byte`, `bits_per_dim`).
    learning_rate: the schedule, called with the optimizer's iterations for
      the logged learning rate.
    resume: continue from the latest checkpoint in `backup_dir`, if any.
    stop_after_epochs: stop after this many epochs of this call (as if
      interrupted).
    verbose: 0 silent, else one line per epoch (chief only).
    print_fn: where the lines go.

  Returns:
    dict: `history` (per-epoch lists, keys as in `fit`), `validation` (final
    evaluation: `loss` and `unit`), `steps_done`, `train_seconds`, `chief`.
  """
  chief = is_chief(strategy)
  optimizer = model.optimizer
  variables = model.trainable_variables
  with strategy.scope():
    if not optimizer.built:
      optimizer.build(variables)        # before restoring: no deferred restoration
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

  if chief:
    write_dir, temporary = backup_dir, False
    os.makedirs(backup_dir, exist_ok=True)
  else:
    task = strategy.cluster_resolver.task_id
    write_dir, temporary = tempfile.mkdtemp(prefix=f"train_worker{task}_backup_"), True
  manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=1)
  writers = {}
  try:
    if resume:
      latest = tf.train.latest_checkpoint(backup_dir)
      if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    _check_same_step(strategy, step)
    start_step = int(step.numpy())

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_train_step(x, y):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = tf.reduce_mean(loss_fn(y, logits), axis=-1)          # (b,) nats
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
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
      for _ in range(validation_steps):
        t, c = eval_step(iterator)
        total, count = total + float(t), count + float(c)
      loss = total / max(count, 1.0)
      return {"loss": loss, unit: loss / math.log(2.0)}

    if chief and log_dir:
      writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                 for name in ("train", "validation")}
    history = {unit: [], "loss": [], f"val_{unit}": [], "val_loss": [], "learning_rate": []}
    epochs = -(-steps // steps_per_epoch)
    iterator = iter(_distribute(strategy, train_ds.skip(start_step)))
    epochs_run = 0
    start = time.time()
    while int(step.numpy()) < steps:
      epoch = int(step.numpy()) // steps_per_epoch
      count = min(steps_per_epoch, steps - int(step.numpy()))
      epoch_start = time.time()
      total = tf.constant(0.0)
      for _ in range(count):
        total += train_step(iterator)
        step.assign_add(1)
      loss = float(total) / count
      seconds = time.time() - epoch_start
      val = evaluate()
      logs = {unit: loss / math.log(2.0), "loss": loss, f"val_{unit}": val[unit],
              "val_loss": val["loss"]}
      if learning_rate is not None:
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            learning_rate(optimizer.iterations)))
      for name, value in logs.items():
        history[name].append(value)

      manager.save(checkpoint_number=step)     # every worker (collective-safe)
      if temporary:
        shutil.rmtree(write_dir, ignore_errors=True)
      if chief:
        with open(os.path.join(backup_dir, "training_metadata.json"), "w") as f:
          json.dump({"epoch": epoch + 1, "step": int(step.numpy())}, f)
        for name, writer in writers.items():
          prefix = "val_" if name == "validation" else ""
          with writer.as_default():
            for key in ("loss", unit) + (("learning_rate",) if name == "train" else ()):
              if prefix + key in logs:
                tf.summary.scalar(f"epoch_{key}", logs[prefix + key], step=epoch)
          writer.flush()
        if verbose:
          print_fn(f"Epoch {epoch + 1}/{epochs}\n{count}/{count} - {seconds:.0f}s - "
                   f"{_per_step(seconds / count)} - {_format_logs(logs)}")
      epochs_run += 1
      if stop_after_epochs and epochs_run >= stop_after_epochs:
        break
    train_seconds = time.time() - start
    final = evaluate()
    return {"history": {k: v for k, v in history.items() if v}, "validation": final,
            "steps_done": int(step.numpy()), "train_seconds": train_seconds, "chief": chief}
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
