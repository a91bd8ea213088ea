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
    .venv/bin/python train_main.py --resume --steps=2400   # ... or train it longer

This script turns the flags into a `sparse_attention_tf.training.TrainConfig`
(the training flags take its defaults), loads the data, builds and compiles
the model, trains it with `training.fit` (default, mirrored) or
`training.distributed_fit` (multi_worker), and writes into --output_dir:
`backup/` (the last two checkpoints: weights, optimizer state, step and
dropout RNG state, every --steps_per_epoch steps (and --save_every_steps),
and `run_config.json`, the flags they belong to),
`logs/` (TensorBoard: loss, bits per token and learning rate, per epoch and
every --log_every_steps steps), `model.keras` (the trained model),
`sample.txt` / `sample.png` / `sample.wav` (generated), `metrics.json`; with
--export_dir, a SavedModel for TF Serving in `<export_dir>/<export_version>/`.
The bits per token are named for the data's tokens: bits_per_byte (pydoc,
text:), bits_per_dim (images), bits_per_sample (µ-law audio).

Batches: --batch_size is the global batch; each of R replicas (all
replicas of all workers) gets batch_size / R examples per step (it must
divide evenly), so a step sees the same examples whatever the strategy.

--resume continues from output_dir/backup with the same weights, optimizer
state, step, data position and dropout masks (a damaged newest checkpoint is
reported and the previous one used). The flags the checkpoint belongs to
(`checkpoint_flags`: the data, vocabulary and sequence, the model's sizes,
pattern and its parameters, position embedding, mixed precision and
--steps_per_epoch) must keep their values: a --resume with others stops and
names them. The rest may change, e.g. --steps (the schedule follows the new
total), --learning_rate, --dropout, --block_size, --implementation,
--strategy (all strategies write one checkpoint format). Without a
checkpoint, --resume says so and starts fresh; without --resume, a run
starts over and replaces backup/ and logs/.

Exit status: 0 done; 2 a bad flag or input (one line on stderr); 42
interrupted, restart with --resume: a SIGTERM (preemption: a checkpoint is
saved first; under multi_worker all workers save at the same step and exit
42) or a lost peer worker (the survivors exit 42; restart every worker with
--resume). scripts/supervise_workers.py restarts workers that way.

--strategy=multi_worker trains with `sparse_attention_tf.training.distributed_fit`
(Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy, keras-team/keras#20585):
the same model, optimizer, schedule, data and outputs; worker 0 (the chief)
writes them, the other workers save their checkpoints into temporary
directories they delete, and --resume restores the chief's checkpoint on
every worker (output_dir must be on a file system they all see).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Optional

from absl import app, flags
import keras
import numpy as np
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import data as data_lib
from sparse_attention_tf import export as export_lib
from sparse_attention_tf import training as training_lib

FLAGS = flags.FLAGS
DEFAULTS = training_lib.TrainConfig()   # the training flags' defaults, with their reasons

# --- data ------------------------------------------------------------------------
flags.DEFINE_string("dataset", "pydoc", "pydoc | pystdlib | text:PATH (a file, a folder or a "
                    "glob) | digits | tfds:NAME | wav:DIR")
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
flags.DEFINE_enum("implementation", "auto",
                  ["auto", "custom_op", "custom_op_unfused", "reference", "dense"],
                  "attention implementation")
# --- optimisation (defaults: training.TrainConfig) -------------------------------
flags.DEFINE_integer("batch_size", DEFAULTS.batch_size, "global batch size")
flags.DEFINE_integer("steps", DEFAULTS.steps, "training steps in total")
flags.DEFINE_integer("steps_per_epoch", DEFAULTS.steps_per_epoch,
                     "steps between checkpoints and validations")
flags.DEFINE_integer("save_every_steps", 0, "also save a checkpoint every this many steps "
                     "(0: only after each epoch)")
flags.DEFINE_integer("validation_steps", DEFAULTS.validation_steps,
                     "validation batches per evaluation")
flags.DEFINE_float("learning_rate", DEFAULTS.learning_rate, "peak learning rate")
flags.DEFINE_integer("warmup_steps", DEFAULTS.warmup_steps,
                     "linear warm-up steps, then cosine decay to 0")
flags.DEFINE_float("weight_decay", DEFAULTS.weight_decay, "AdamW weight decay")
flags.DEFINE_float("clipnorm", DEFAULTS.clipnorm, "clip gradients by this global norm")
flags.DEFINE_integer("seed", 0, "random seed (initialisation, data order, sampling)")
# --- distribution and outputs ----------------------------------------------------
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy")
flags.DEFINE_integer("cpu_replicas", 2, "mirrored without GPUs: logical CPU devices to use")
flags.DEFINE_bool("resume", DEFAULTS.resume, "continue from the checkpoint in output_dir/backup "
                  "(the flags it belongs to must not change; none there: start fresh)")
flags.DEFINE_integer("log_every_steps", DEFAULTS.log_every_steps,
                     "TensorBoard scalars every this many steps (and after every epoch)")
flags.DEFINE_string("export_dir", None, "also export a SavedModel for TF Serving here "
                    "(<export_dir>/<export_version>/, see sparse_attention_tf.export)")
flags.DEFINE_enum("export_mode", "portable", ["portable", "custom_op"],
                  "portable: stock TF ops only; custom_op: needs the op library to load")
flags.DEFINE_integer("export_version", 1, "the TF Serving version number of the export")
flags.DEFINE_bool("export_overwrite", False, "replace an existing export of that version")
flags.DEFINE_integer("sample_tokens", 256, "tokens to generate at the end (text/audio)")
flags.DEFINE_integer("stop_after_epochs", DEFAULTS.stop_after_epochs, "stop after this many "
                     "epochs of this run, as if interrupted (to test --resume)")
flags.DEFINE_integer("verbose", DEFAULTS.verbose,
                     "Keras progress bars: 0 silent, 1 bars, 2 one line per epoch")

RUN_CONFIG = "run_config.json"   # beside the checkpoint: the flags it belongs to
# The pattern flags each pattern reads (head_mode: how a pattern's components share heads).
PATTERN_FLAGS = {"fixed": ("stride", "summary", "head_groups", "head_mode"),
                 "strided": ("stride", "head_mode"), "local": ("window",),
                 "bigbird": ("window",), "dense": ()}


class UsageError(ValueError):
  """A bad flag: reported as one line, exit status 2."""


@dataclasses.dataclass
class RunState:
  """What `main` undoes when a run fails before training starts."""
  created: Optional[str] = None   # the first folder of --output_dir this run created
  training: bool = False          # training has started: a failure keeps every output


def check_folder_flag(flag: str, path: str) -> None:
  """Checks, creating nothing, that this run can make and write folder `path`, the value of
  `flag` (--output_dir, --export_dir), so that a bad one stops the run before its work.

  Raises:
    UsageError: `path` is empty, not UTF-8 (TensorFlow's file functions take UTF-8
      paths), a file, under a file, or in a folder this process cannot write in
      (permissions, a read-only file system).
  """
  if not path:
    raise UsageError(f"{flag} is empty: give a folder.")
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    raise UsageError(f"{flag}={os.fsencode(path)!r} is not UTF-8, which TensorFlow needs for "
                     f"its file names: choose a UTF-8 name.") from None
  folder = os.path.abspath(path)
  while not os.path.lexists(folder):            # up to the first part that exists
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    what = "a broken symbolic link" if os.path.islink(folder) else "a file"
    where = "" if folder == os.path.abspath(path) else f" is under {folder}, which"
    raise UsageError(f"{flag}={path}{where} is {what}, not a folder: choose another path.")
  try:   # the only sure test (os.access misses read-only file systems for root)
    os.rmdir(tempfile.mkdtemp(prefix=".train_main_write_test_", dir=folder))
  except OSError as e:
    raise UsageError(f"{flag}={path}: cannot write in {folder} ({e.strerror}): choose a "
                     f"writable folder.") from None


def make_output_dir(path: str, state: RunState) -> None:
  """Creates --output_dir and its missing parents, noting in `state` the first it creates."""
  folder = os.path.abspath(path)
  while not os.path.lexists(os.path.dirname(folder)):
    folder = os.path.dirname(folder)
  if not os.path.lexists(folder):
    state.created = folder
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--output_dir={path}: cannot create it ({e.strerror}).") from None


def make_strategy():
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


def make_pattern():
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


def train_config() -> training_lib.TrainConfig:
  """The training flags as a `TrainConfig` (checks their values); the data's unit and
  validation steps are added once it is loaded."""
  out_dir = FLAGS.output_dir
  return training_lib.TrainConfig(
      steps=FLAGS.steps, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
      clipnorm=FLAGS.clipnorm, steps_per_epoch=FLAGS.steps_per_epoch,
      validation_steps=FLAGS.validation_steps, stop_after_epochs=FLAGS.stop_after_epochs,
      save_every_steps=FLAGS.save_every_steps or None,
      verbose=FLAGS.verbose, backup_dir=os.path.join(out_dir, "backup"),
      resume=FLAGS.resume, log_dir=os.path.join(out_dir, "logs"),
      log_every_steps=FLAGS.log_every_steps)


# ---------------------------------------------------------------------------
# The flags a checkpoint belongs to


def checkpoint_flags(data: data_lib.TokenData, embedding: str) -> dict:
  """The values a --resume must not change, by flag name, as this run resolves them.

  They define the model's weights and function: the data (its vocabulary and
  tokens), the sequence length, the sizes, the pattern and the parameters it
  reads, the position embedding (and its row width, --stride, when strided),
  the mixed precision (mixed_float16 adds loss-scale state to the optimizer);
  and --steps_per_epoch (the epochs of the logs and metadata count in it).
  Every other flag may change: --block_size, --implementation, --recompute
  and --strategy compute the same function another way (one checkpoint
  format for all strategies); --steps, --learning_rate, --warmup_steps,
  --dropout, ... change how training goes on; --batch_size and --seed change
  which examples come next (training continues, but no longer exactly as an
  uninterrupted run would).
  """
  values = {"dataset": FLAGS.dataset, "vocab_size": data.vocab_size, "seq_len": data.seq_len,
            "num_layers": FLAGS.num_layers, "d_model": FLAGS.d_model,
            "num_heads": FLAGS.num_heads, "pattern": FLAGS.pattern}
  for name in PATTERN_FLAGS[FLAGS.pattern]:
    values[name] = FLAGS[name].value
  values["embedding"] = embedding
  if embedding == "strided":
    values["stride"] = FLAGS.stride
  values.update(mixed_precision=FLAGS.mixed_precision, steps_per_epoch=FLAGS.steps_per_epoch)
  return values


def changed_flags(old: dict, new: dict) -> list:
  """`--name old -> new` for each checkpoint flag both runs have and that differs."""
  changes = []
  for name, value in new.items():
    if name in old and old[name] != value:
      label = f"--{name}" if name in FLAGS else f"{name} (of --dataset)"
      changes.append(f"{label} {old[name]} -> {value}")
  return changes


def prepare_backup(backup_dir: str, logs_dir: str, flag_values: dict, chief: bool) -> None:
  """Starts the run's checkpoint folder: checks what --resume continues, or starts over.

  With --resume and a checkpoint, the flags saved beside it must equal
  `flag_values` (else `UsageError`, naming each difference); with --resume and
  no checkpoint, the run starts fresh (and says so). Without --resume the
  chief removes backup/ and logs/. The chief then saves the flags of this
  run (all of them, for the record) beside the checkpoint.
  """
  path = os.path.join(backup_dir, RUN_CONFIG)
  if FLAGS.resume:
    if not training_lib.find_checkpoint(backup_dir):
      if chief:
        print(f"--resume: no checkpoint in {backup_dir}: starting fresh", flush=True)
    elif os.path.exists(path):
      with open(path) as f:
        changes = changed_flags(json.load(f)["checkpoint_flags"], flag_values)
      if changes:
        raise UsageError(f"--resume: the checkpoint in {backup_dir} belongs to other flags "
                         f"(old -> new): {', '.join(changes)}; resume with the old values, or "
                         f"start over without --resume or with another --output_dir.")
    elif chief:
      print(f"--resume: {path} is missing, so the checkpoint's flags are not checked",
            flush=True)
  elif chief:
    shutil.rmtree(backup_dir, ignore_errors=True)
    shutil.rmtree(logs_dir, ignore_errors=True)
  if chief:
    os.makedirs(backup_dir, exist_ok=True)
    module = FLAGS.find_module_defining_flag("dataset")
    record = {"checkpoint_flags": flag_values,
              "flags": {f.name: f.value for f in FLAGS.flags_by_module_dict()[module]}}
    with open(path + ".tmp", "w") as f:   # then renamed: other workers may read it
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------
# Outputs


def write_sample(data, tokens, out_dir):
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


def generate_sample(model, data):
  """A sample of the trained model: an image from BOS, or text/audio after a prompt."""
  if data.kind == "image":
    image = model.sample_images(1, data.bos, sampler=sat.Sampler(seed=FLAGS.seed))[0]
    return np.concatenate([[data.bos], image.reshape(-1)])          # as write_sample reads it
  x, _ = next(iter(data.validation.batch(1)))
  prompt = x.numpy()[0, :min(32, data.seq_len // 2)]
  count = min(FLAGS.sample_tokens, data.seq_len - len(prompt))
  return model.generate(prompt, count, temperature=0.8, top_k=40, seed=FLAGS.seed)


def save_model(model, out_dir, chief):
  """Saves model.keras. Under multi_worker every worker saves (saving may read values
  that need all workers, the usual pattern); only the chief's file is kept."""
  if chief:
    model.save(os.path.join(out_dir, "model.keras"))
    return
  scratch = tempfile.mkdtemp(prefix="train_worker_model_")
  try:
    model.save(os.path.join(scratch, "model.keras"))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------
# The run


def train(state: Optional[RunState] = None):
  """The run: strategy, data, model, training (fit or distributed_fit), outputs; notes in
  `state` the folder it creates and when training starts."""
  state = state or RunState()
  strategy = make_strategy()   # before anything else touches TF devices
  try:
    config = train_config()
  except ValueError as e:      # TrainConfig's fields are named like the flags
    raise UsageError(f"--{e}") from None
  keras.utils.set_random_seed(FLAGS.seed)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise UsageError(f"--batch_size ({config.batch_size}) must be a multiple of the number of "
                     f"replicas ({replicas}).")
  if FLAGS.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)

  data = data_lib.load(FLAGS.dataset, FLAGS.seq_len, data_dir=FLAGS.data_dir, seed=FLAGS.seed)
  seq_len = data.seq_len
  if seq_len % FLAGS.block_size:
    raise UsageError(f"--seq_len ({seq_len}) must be a multiple of --block_size "
                     f"({FLAGS.block_size}).")
  embedding = FLAGS.embedding or ("image" if data.kind == "image" else "strided")
  available = data.num_validation_examples // config.batch_size
  if available < 1:
    raise UsageError(f"the validation split has {data.num_validation_examples} sequences, "
                     f"fewer than one batch of {config.batch_size}: lower --batch_size or "
                     f"--seq_len.")
  config = dataclasses.replace(config, unit=data.unit,
                               validation_steps=min(config.validation_steps, available))

  if FLAGS.export_dir:   # before training, not after it
    try:
      export_lib.version_path(FLAGS.export_dir, FLAGS.export_version, FLAGS.export_overwrite)
    except FileExistsError:
      existing = os.path.join(FLAGS.export_dir, str(FLAGS.export_version))
      raise UsageError(f"--export_dir: {existing} already exists: pass --export_overwrite to "
                       f"replace it, or another --export_version.") from None

  chief = training_lib.is_chief(strategy)
  custom_loop = FLAGS.strategy == "multi_worker"   # Keras fit fails there (keras#20585)
  out_dir = FLAGS.output_dir
  if chief:
    make_output_dir(out_dir, state)

  # Data: an endless, deterministic stream of batches (a resumed run skips the
  # batches already trained on, so it continues at the same position).
  train_ds = data_lib.make_batches(data.train.repeat(), config.batch_size, shuffle=True,
                                   seed=FLAGS.seed, drop_remainder=True)
  val_ds = data_lib.make_batches(data.validation, config.batch_size, shuffle=False,
                                 seed=FLAGS.seed, drop_remainder=True)
  with strategy.scope():
    pattern = make_pattern()
    model = sat.SparseTransformer(
        vocab_size=data.vocab_size, seq_len=seq_len, num_layers=FLAGS.num_layers,
        d_model=FLAGS.d_model, num_heads=FLAGS.num_heads, pattern=pattern,
        head_mode=FLAGS.head_mode, embedding=embedding, image_shape=data.image_shape,
        embedding_stride=FLAGS.stride, dropout=FLAGS.dropout, recompute=FLAGS.recompute,
        block_size=FLAGS.block_size, implementation=FLAGS.implementation)
    training_lib.compile_model(model, config)
    model(np.zeros((1, seq_len), np.int32))                            # build before restoring
  # Only now, with every flag checked and the model built: a bad flag must not cost the
  # previous run its checkpoint.
  prepare_backup(config.backup_dir, config.log_dir, checkpoint_flags(data, embedding), chief)

  state.training = True
  print(f"training {FLAGS.dataset} ({data.kind}, {data.num_train_examples} train / "
        f"{data.num_validation_examples} validation sequences of {seq_len}), "
        f"{FLAGS.num_layers} layers x {FLAGS.d_model}, {pattern!r}, strategy "
        f"{FLAGS.strategy} ({replicas} replica{'s' if replicas > 1 else ''})", flush=True)
  if custom_loop:
    run = training_lib.distributed_fit(strategy, model, train_ds, val_ds, config,
                                       print_fn=lambda line: print(line, flush=True))
  else:
    run = training_lib.fit(model, train_ds, val_ds, config,
                           print_fn=lambda line: print(line, flush=True))
  save_model(model, out_dir, chief)

  history, final, steps_done = run["history"], run["validation"], run["steps_done"]
  results = {"dataset": FLAGS.dataset, "seq_len": seq_len, "train_seconds": run["train_seconds"],
             "steps_done": steps_done,
             "validation": {k: float(v) for k, v in final.items()},
             "history": {k: [float(x) for x in v] for k, v in history.items()}}
  if custom_loop:   # the replicas are synchronous: every worker ends with the same weights
    checksum = sum(float(np.abs(v).sum(dtype=np.float64)) for v in model.get_weights())
    print(f"worker {strategy.cluster_resolver.task_id} done: {steps_done} steps, final training "
          f"loss {history['loss'][-1]:.9g}, weight checksum {checksum:.12g}", flush=True)
  if not chief:
    return results
  sample = write_sample(data, generate_sample(model, data), out_dir)
  if FLAGS.export_dir:
    exported = export_lib.export_saved_model(model, FLAGS.export_dir, mode=FLAGS.export_mode,
                                             version=FLAGS.export_version,
                                             overwrite=FLAGS.export_overwrite)
    print(f"SavedModel ({FLAGS.export_mode}): {exported}")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nvalidation {data.unit}: {final[data.unit]:.3f} after {steps_done} steps "
        f"({run['train_seconds']:.0f} s)")
  print(f"checkpoint: {config.backup_dir}\nTensorBoard: tensorboard --logdir {config.log_dir}\n"
        f"model: {out_dir}/model.keras\nsample: {sample}\nmetrics: {out_dir}/metrics.json")
  return results


def main(argv):
  if len(argv) > 1:
    print(f"train_main.py: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  state = RunState()
  try:
    check_folder_flag("--output_dir", FLAGS.output_dir)
    if FLAGS.export_dir:
      check_folder_flag("--export_dir", FLAGS.export_dir)
    train(state)
  except BaseException as e:
    if state.created and not state.training:   # no half-made output folder
      shutil.rmtree(state.created, ignore_errors=True)
    if isinstance(e, training_lib.Interrupted):   # SIGTERM or a lost peer: restart me
      print(f"train_main.py: {e}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      # Not sys.exit: after a lost peer, TF's shutdown would wait for it.
      os._exit(e.exit_code)
    # UsageError, the data module's DataError, pattern/model checks; OSError before training
    if isinstance(e, ValueError) or (isinstance(e, OSError) and not state.training):
      print(f"train_main.py: error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  app.run(main)
