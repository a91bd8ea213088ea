"""Train a Sparse Transformer (Keras `model.fit`; a tf.distribute custom loop for multi_worker).

    bash scripts/train.sh                                  # set-up, then the defaults below
    .venv/bin/python train_main.py                         # byte-level LM on Python's docs
    .venv/bin/python train_main.py --dataset=text:enwik8 --seq_len=1024 --steps=100000
    .venv/bin/python train_main.py --dataset=digits --pattern=strided --stride=8
    .venv/bin/python train_main.py --dataset=tfds:cifar10 --data_dir=~/tensorflow_datasets
    .venv/bin/python train_main.py --dataset=wav:recordings/ --seq_len=4096
    .venv/bin/python train_main.py --strategy=mirrored     # all local GPUs (or --cpu_replicas CPUs)
    TF_CONFIG=... .venv/bin/python train_main.py --strategy=multi_worker
    .venv/bin/python train_main.py --resume                # continue an interrupted run

Writes into --output_dir: `backup/` (the last checkpoint: weights, optimizer
state and position, every --steps_per_epoch steps), `logs/` (TensorBoard:
loss, bits per byte/dim, learning rate), `model.keras` (the trained model),
`sample.txt` / `sample.png` / `sample.wav` (generated), `metrics.json`; with
--export_dir, a SavedModel for TF Serving in `<export_dir>/1/`.

Batches: --batch_size is the global batch; each of R replicas (all
replicas of all workers) gets batch_size / R examples per step (it must
divide evenly), so a step sees the same examples whatever the strategy.

--strategy=multi_worker trains with `sparse_attention_tf.training.distributed_fit`
(Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy, keras-team/keras#20585):
the same model, optimizer, schedule, data and outputs; worker 0 (the chief)
writes them, the other workers save their checkpoints into temporary
directories they delete, and --resume restores the chief's checkpoint on
every worker (output_dir must be on a file system they all see).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS

# --- data ------------------------------------------------------------------------
flags.DEFINE_string("dataset", "pydoc", "pydoc | text:PATH | digits | tfds:NAME | wav:DIR")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder (for tfds:NAME)")
flags.DEFINE_integer("seq_len", None, "tokens per sequence (default: 256 for text and audio, "
                     "the image size for images)")
flags.DEFINE_string("output_dir", "runs/default", "checkpoints, logs, model and samples")
# --- model -----------------------------------------------------------------------
flags.DEFINE_integer("num_layers", 2, "residual blocks")
flags.DEFINE_integer("d_model", 128, "width")
flags.DEFINE_integer("num_heads", 4, "attention heads")
flags.DEFINE_enum("pattern", "fixed", ["fixed", "strided", "local", "dense", "bigbird"],
                  "sparsity pattern")
flags.DEFINE_integer("stride", 64, "fixed/strided: window length l")
flags.DEFINE_integer("summary", 16, "fixed: summary positions c per window")
flags.DEFINE_integer("head_groups", 1, "fixed: number of different summary sets")
flags.DEFINE_integer("window", 64, "local: window; bigbird: block size")
flags.DEFINE_enum("head_mode", "merged", ["merged", "interleaved", "multihead"],
                  "how pattern components share heads and layers")
flags.DEFINE_enum("embedding", None, ["learned", "image", "strided"],
                  "position embedding (default: image for images, strided otherwise)")
flags.DEFINE_integer("block_size", 32, "attention kernel block size")
flags.DEFINE_float("dropout", 0.1, "dropout at the end of each residual branch")
flags.DEFINE_bool("recompute", False, "recompute attention and feed-forward in the backward pass")
flags.DEFINE_enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"],
                  "Keras mixed precision policy")
flags.DEFINE_enum("implementation", "auto", ["auto", "custom_op", "custom_op_unfused", "reference", "dense"],
                  "attention implementation")
# --- optimisation ----------------------------------------------------------------
flags.DEFINE_integer("batch_size", 16, "global batch size")
flags.DEFINE_integer("steps", 1200, "training steps in total")
flags.DEFINE_integer("steps_per_epoch", 200, "steps between checkpoints and validations")
flags.DEFINE_integer("validation_steps", 10, "validation batches per evaluation")
flags.DEFINE_float("learning_rate", 2e-3, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 50, "linear warm-up steps, then cosine decay to 0")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
flags.DEFINE_float("clipnorm", 1.0, "clip gradients by this global norm")
flags.DEFINE_integer("seed", 0, "random seed (initialisation, data order, sampling)")
# --- distribution and outputs ----------------------------------------------------
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy")
flags.DEFINE_integer("cpu_replicas", 2, "mirrored without GPUs: logical CPU devices to use")
flags.DEFINE_bool("resume", False, "continue from the checkpoint in output_dir/backup")
flags.DEFINE_string("export_dir", None, "also export a SavedModel for TF Serving here "
                    "(<export_dir>/1/, see sparse_attention_tf.export)")
flags.DEFINE_enum("export_mode", "portable", ["portable", "custom_op"],
                  "portable: stock TF ops only; custom_op: needs the op library to load")
flags.DEFINE_integer("sample_tokens", 256, "tokens to generate at the end (text/audio)")
flags.DEFINE_integer("stop_after_epochs", None, "stop after this many epochs of this run, as if "
                     "interrupted (to test --resume)")
flags.DEFINE_integer("verbose", 1, "Keras progress bars: 0 silent, 1 bars, 2 one line per epoch")


class UsageError(ValueError):
  """A bad flag: reported as one line, exit status 2."""


def make_strategy(tf):
  """The tf.distribute strategy named by --strategy."""
  if FLAGS.strategy == "default":
    return tf.distribute.get_strategy()
  if FLAGS.strategy == "mirrored":
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
      return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.cpu_replicas)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
  if not os.environ.get("TF_CONFIG"):
    raise UsageError("--strategy=multi_worker needs TF_CONFIG (cluster and task) in the "
                     "environment.")
  return tf.distribute.MultiWorkerMirroredStrategy()


def make_pattern(sat, seq_len, num_heads):
  """The sparsity pattern from the flags."""
  if FLAGS.pattern == "fixed":
    return sat.Fixed(FLAGS.stride, FLAGS.summary, heads=None, head_groups=FLAGS.head_groups)
  if FLAGS.pattern == "strided":
    return sat.Strided(FLAGS.stride)
  if FLAGS.pattern == "local":
    return sat.Local(FLAGS.window)
  if FLAGS.pattern == "bigbird":
    return sat.BigBird(block=FLAGS.window, causal=True)
  return sat.Dense()


def write_sample(data_lib, data, tokens, out_dir, np, tf):
  """Writes generated tokens as text, a PNG image or a WAV file; returns the path."""
  if data.kind == "text":
    path = os.path.join(out_dir, "sample.txt")
    with open(path, "wb") as f:
      f.write(bytes(int(t) for t in tokens))
    return path
  if data.kind == "image":
    h, w, c = data.image_shape
    pixels = np.asarray(tokens[1:1 + h * w * c], np.float32)           # drop the BOS token
    levels = data.vocab_size - 1
    image = np.clip(np.round(pixels * 255.0 / (levels - 1)), 0, 255).astype(np.uint8)
    image = image.reshape(h, w, c)
    scale = max(1, 128 // max(h, w))                                  # small images: enlarge
    image = np.kron(image, np.ones((scale, scale, 1), np.uint8))
    path = os.path.join(out_dir, "sample.png")
    tf.io.write_file(path, tf.io.encode_png(image))
    return path
  audio = data_lib.mu_law_decode(np.asarray(tokens)).astype(np.float32)
  path = os.path.join(out_dir, "sample.wav")
  tf.io.write_file(path, tf.audio.encode_wav(audio[:, None], data.sample_rate or 16000))
  return path


def train():
  import numpy as np
  import tensorflow as tf
  strategy = make_strategy(tf)   # before anything else touches TF devices

  import keras
  import sparse_attention_tf as sat
  from sparse_attention_tf import data as data_lib
  from sparse_attention_tf import training as training_lib

  keras.utils.set_random_seed(FLAGS.seed)
  for name in ("steps", "steps_per_epoch", "batch_size", "validation_steps"):
    if getattr(FLAGS, name) < 1:
      raise UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}.")
  replicas = strategy.num_replicas_in_sync
  if FLAGS.batch_size % replicas:
    raise UsageError(f"--batch_size ({FLAGS.batch_size}) must be a multiple of the number of "
                     f"replicas ({replicas}).")
  if FLAGS.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)

  data = data_lib.load(FLAGS.dataset, FLAGS.seq_len, data_dir=FLAGS.data_dir, seed=FLAGS.seed)
  seq_len = data.seq_len
  if seq_len % FLAGS.block_size:
    raise UsageError(f"--seq_len ({seq_len}) must be a multiple of --block_size "
                     f"({FLAGS.block_size}).")
  embedding = FLAGS.embedding or ("image" if data.kind == "image" else "strided")
  unit = "bits_per_dim" if data.kind == "image" else "bits_per_byte"

  chief = training_lib.is_chief(strategy)
  custom_loop = FLAGS.strategy == "multi_worker"   # Keras fit fails there (keras#20585)
  out_dir = FLAGS.output_dir
  backup_dir = os.path.join(out_dir, "backup")  # multi_worker: the chief's; others use temp dirs
  if chief:
    if not FLAGS.resume:
      shutil.rmtree(backup_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)

  # Data: an endless, deterministic stream of batches; a resumed run skips
  # the batches already trained on, so it continues at the same position.
  epochs = -(-FLAGS.steps // FLAGS.steps_per_epoch)
  start_epoch = 0
  metadata = os.path.join(backup_dir, "training_metadata.json")
  if FLAGS.resume and os.path.exists(metadata) and not custom_loop:
    with open(metadata) as f:
      start_epoch = int(json.load(f)["epoch"])
  train_ds = data_lib.make_batches(data.train.repeat(), FLAGS.batch_size, shuffle=True,
                                   seed=FLAGS.seed, drop_remainder=True)
  if not custom_loop:   # the custom loop skips the steps of the checkpoint it restores
    train_ds = train_ds.skip(start_epoch * FLAGS.steps_per_epoch)
  val_ds = data_lib.make_batches(data.validation, FLAGS.batch_size, shuffle=False,
                                 seed=FLAGS.seed, drop_remainder=True)
  val_steps = min(FLAGS.validation_steps, data.num_validation_examples // FLAGS.batch_size)
  if val_steps < 1:
    raise UsageError(f"the validation split has {data.num_validation_examples} sequences, "
                     f"fewer than one batch of {FLAGS.batch_size}: lower --batch_size or "
                     f"--seq_len.")

  with strategy.scope():
    pattern = make_pattern(sat, seq_len, FLAGS.num_heads)
    model = sat.SparseTransformer(
        vocab_size=data.vocab_size, seq_len=seq_len, num_layers=FLAGS.num_layers,
        d_model=FLAGS.d_model, num_heads=FLAGS.num_heads, pattern=pattern,
        head_mode=FLAGS.head_mode, embedding=embedding, image_shape=data.image_shape,
        embedding_stride=FLAGS.stride, dropout=FLAGS.dropout, recompute=FLAGS.recompute,
        block_size=FLAGS.block_size, implementation=FLAGS.implementation)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, FLAGS.steps - FLAGS.warmup_steps),
        warmup_target=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=FLAGS.weight_decay,
                                       global_clipnorm=FLAGS.clipnorm)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[sat.BitsPerToken(name=unit)])
    model(np.zeros((1, seq_len), np.int32))                            # build before restoring

  print(f"training {FLAGS.dataset} ({data.kind}, {data.num_train_examples} train / "
        f"{data.num_validation_examples} validation sequences of {seq_len}), "
        f"{FLAGS.num_layers} layers x {FLAGS.d_model}, {pattern!r}, strategy "
        f"{FLAGS.strategy} ({replicas} replica{'s' if replicas > 1 else ''})", flush=True)
  if custom_loop:
    run = training_lib.distributed_fit(
        strategy, model, train_ds, val_ds, steps=FLAGS.steps,
        steps_per_epoch=FLAGS.steps_per_epoch, validation_steps=val_steps,
        global_batch_size=FLAGS.batch_size, backup_dir=backup_dir,
        log_dir=os.path.join(out_dir, "logs"), unit=unit, learning_rate=schedule,
        resume=FLAGS.resume, stop_after_epochs=FLAGS.stop_after_epochs,
        verbose=FLAGS.verbose, print_fn=lambda line: print(line, flush=True))
    history, final, elapsed = run["history"], run["validation"], run["train_seconds"]
    steps_done = run["steps_done"]
    # Every worker saves (the standard MWMS pattern: saving may read values that
    # need all workers); only the chief's file is kept.
    if chief:
      model.save(os.path.join(out_dir, "model.keras"))
    else:
      scratch = tempfile.mkdtemp(prefix="train_worker_model_")
      try:
        model.save(os.path.join(scratch, "model.keras"))
      finally:
        shutil.rmtree(scratch, ignore_errors=True)
  else:
    history, final, elapsed = fit(keras, model, schedule, train_ds, val_ds, val_steps,
                                  epochs, backup_dir, out_dir)
    steps_done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    model.save(os.path.join(out_dir, "model.keras"))

  results = {"dataset": FLAGS.dataset, "seq_len": seq_len, "train_seconds": elapsed,
             "steps_done": steps_done,
             "validation": {k: float(v) for k, v in final.items()},
             "history": {k: [float(x) for x in v] for k, v in history.items()}}
  if custom_loop:   # the replicas are synchronous: every worker ends with the same weights
    checksum = sum(float(np.abs(v).sum(dtype=np.float64)) for v in model.get_weights())
    print(f"worker {strategy.cluster_resolver.task_id} done: {steps_done} steps, final training "
          f"loss {history['loss'][-1]:.9g}, weight checksum {checksum:.12g}", flush=True)
  if not chief:
    return results
  if data.kind == "image":
    prompt = np.array([data.bos], np.int32)
    tokens = model.generate(prompt, seq_len, temperature=1.0, seed=FLAGS.seed)
  else:
    x, _ = next(iter(data.validation.batch(1)))
    prompt = x.numpy()[0, :min(32, seq_len // 2)]
    count = min(FLAGS.sample_tokens, seq_len - len(prompt))
    tokens = model.generate(prompt, count, temperature=0.8, top_k=40, seed=FLAGS.seed)
  sample = write_sample(data_lib, data, tokens, out_dir, np, tf)
  if FLAGS.export_dir:
    from sparse_attention_tf import export as export_lib
    exported = export_lib.export_saved_model(model, FLAGS.export_dir, mode=FLAGS.export_mode)
    print(f"SavedModel ({FLAGS.export_mode}): {exported}")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nvalidation {unit}: {final[unit]:.3f} after {steps_done} steps ({elapsed:.0f} s)")
  print(f"checkpoint: {backup_dir}\nTensorBoard: tensorboard --logdir {out_dir}/logs\n"
        f"model: {out_dir}/model.keras\nsample: {sample}\nmetrics: {out_dir}/metrics.json")
  return results


def fit(keras, model, schedule, train_ds, val_ds, val_steps, epochs, backup_dir, out_dir):
  """Keras `fit` (default and mirrored strategies); returns (history, final, seconds)."""

  class LearningRateLogger(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      if logs is not None:
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            schedule(self.model.optimizer.iterations)))

  class StopAfter(keras.callbacks.Callback):
    """Ends fit after --stop_after_epochs epochs (after the checkpoint is written)."""

    def __init__(self, epochs):
      super().__init__()
      self.left = epochs

    def on_epoch_end(self, epoch, logs=None):
      self.left -= 1
      if self.left <= 0:
        self.model.stop_training = True

  callbacks = [
      keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", delete_checkpoint=False),
      LearningRateLogger(),
      keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), update_freq="epoch"),
  ]
  if FLAGS.stop_after_epochs:
    callbacks.append(StopAfter(FLAGS.stop_after_epochs))
  start = time.time()
  history = model.fit(train_ds, epochs=epochs, steps_per_epoch=FLAGS.steps_per_epoch,
                      validation_data=val_ds, validation_steps=val_steps,
                      callbacks=callbacks, verbose=FLAGS.verbose,
                      shuffle=False)   # the dataset is shuffled, deterministically
  elapsed = time.time() - start
  final = model.evaluate(val_ds, steps=val_steps, return_dict=True, verbose=0)
  return history.history, final, elapsed


def main(argv):
  if len(argv) > 1:
    print(f"train_main.py: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    train()
  except ValueError as e:   # UsageError, the data module's DataError, pattern/model checks
    print(f"train_main.py: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
