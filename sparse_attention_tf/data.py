"""Token datasets for the training script: bytes, pixels and µ-law audio.

Every dataset becomes a stream of integer tokens and is served as unbatched
`(x, y)` pairs of int32 `[seq_len]` sequences where `y` is the next token of
`x`, ready for `make_batches` and a `SparseTransformer` language model.

Specs accepted by `load`:
  pydoc          byte-level text of Python's bundled help topics (~0.47 MB)
  pystdlib       the source of the running Python's standard library as bytes:
                 every regular *.py file below sysconfig's "stdlib" folder, its
                 tests included, site-packages excluded (~30 MB, no download)
  text:PATH      any local file as bytes (enwik8: the paper's 90M/5M/5M split);
                 or a folder (all regular files below it), or a glob of files
                 (text:/data/*.txt, text:/src/**/*.py)
  digits         scikit-learn's bundled 8x8 digits, 17 grey levels
  tfds:NAME      cifar10, mnist or downsampled_imagenet/64x64 from a prepared
                 TFDS data dir (nothing is downloaded)
  wav:DIR        every *.wav file in DIR, 8-bit µ-law, concatenated

Sequences (L = seq_len):
  text, audio    non-overlapping windows of L + 1 tokens w; x = w[:-1], y = w[1:]
  images         p = pixels in raster order, channels innermost (HWC reshape);
                 x = [bos] + p[:-1], y = p, so the first pixel is predicted too

Each dataset names what one token is, in `TokenData.unit`, the name of its
bits-per-token metric: `bits_per_byte` for bytes (pydoc, text), `bits_per_dim`
for image pixels x channels (the paper's bits/dim), `bits_per_sample` for 8-bit
µ-law audio samples.

Splits are deterministic: streams are cut 90% / 5% / 5% (train / validation /
held-out test, never exposed) by position; collections of files (pystdlib, a
folder or a glob of several files) are split by file, about 90% / 5% / 5% of
their bytes with no file straddling two parts (`split_files`: by a hash of each
file's relative path, never by the order a listing returns); within a part the
files are concatenated in sorted relative-path order, each followed by
FILE_SEPARATOR (the byte 0x1C, ASCII's "file separator"). Files are taken as
bytes, whatever their encoding (a few stdlib test files are not UTF-8 on
purpose: they stay in, byte for byte); digits are shuffled once with a fixed
seed and cut 90% / 10%; TFDS datasets use their own train and test (or
validation) splits.

Example:

>>> data = load("digits", seq_len=None)
>>> data.vocab_size, data.seq_len, data.bos
(18, 64, 17)
>>> x, y = next(iter(make_batches(data.train, 4, shuffle=False, seed=0,
...                               drop_remainder=True)))
>>> x.shape, y.shape
(TensorShape([4, 64]), TensorShape([4, 64]))
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import stat
import sysconfig
from typing import Optional

import numpy as np
import tensorflow as tf

DEFAULT_TEXT_SEQ_LEN = 256  # bytes per text / audio example when seq_len is None
TRAIN_PERCENT = 90  # streams: first 90% train ...
VALIDATION_PERCENT = 5  # ... next 5% validation, last 5% held out as test
DIGITS_SPLIT_SEED = 1234  # fixed, so every run sees the same digits split
DIGITS_TRAIN_FRACTION = 0.9
SHUFFLE_BUFFER_BYTES = 128 * 2**20  # cap on the memory held by make_batches' shuffle
MAX_SHUFFLE_BUFFER = 10_000  # examples

# name -> (height, width, channels, evaluation split)
TFDS_IMAGES = {
    "cifar10": (32, 32, 3, "test"),
    "mnist": (28, 28, 1, "test"),
    "downsampled_imagenet/64x64": (64, 64, 3, "validation"),
}

SPEC_FORMS = ("pydoc", "pystdlib", "text:PATH", "digits", "tfds:NAME", "wav:DIR")

# kind -> the bits-per-token metric's name: what one token of that kind is
UNITS = {"text": "bits_per_byte", "image": "bits_per_dim", "audio": "bits_per_sample"}


class DataError(ValueError):
  """A dataset that cannot be loaded; the message is one line for the CLI."""


@dataclasses.dataclass
class TokenData:
  """A tokenized dataset, split into train and validation.

  Attributes:
    name: the spec it was loaded from, e.g. "pydoc" or "tfds:cifar10".
    kind: "text", "image" or "audio".
    unit: what one token is, as the name of the bits-per-token metric:
      "bits_per_byte" (text), "bits_per_dim" (images), "bits_per_sample"
      (audio); see `UNITS`.
    vocab_size: number of token values the model predicts (BOS included).
    seq_len: model sequence length.
    train: unbatched `(x, y)` int32 `[seq_len]` pairs.
    validation: the same, in a fixed order.
    image_shape: `(height, width, channels)` for images, else None.
    bos: the start token of image sequences, else None.
    num_train_examples: number of training pairs.
    num_validation_examples: number of validation pairs.
    sample_rate: for audio, the sample rate of the WAV files.
  """
  name: str
  kind: str
  unit: str
  vocab_size: int
  seq_len: int
  train: tf.data.Dataset
  validation: tf.data.Dataset
  image_shape: Optional[tuple]
  bos: Optional[int]
  num_train_examples: int
  num_validation_examples: int
  sample_rate: Optional[int] = None   # audio: the recordings' rate (for writing samples)


# ---------------------------------------------------------------------------
# µ-law companding (ITU-T G.711 formula, as in WaveNet)


def mu_law_encode(audio, levels: int = 256):
  """Quantizes audio in [-1, 1] to `levels` µ-law tokens (mu = levels - 1).

  F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu), token = round((F + 1) / 2 * mu).

  Args:
    audio: float NumPy array or tf.Tensor, values in [-1, 1] (clipped).
    levels: number of tokens; 256 gives 8-bit tokens 0..255.

  Returns:
    int32 tokens in [0, levels - 1], a NumPy array for NumPy input, else a
    tf.Tensor, with the shape of `audio`.
  """
  mu = float(levels - 1)
  if isinstance(audio, (tf.Tensor, tf.Variable)):
    x = tf.clip_by_value(tf.cast(audio, tf.float32), -1.0, 1.0)
    f = tf.sign(x) * tf.math.log1p(mu * tf.abs(x)) / np.log1p(mu)
    return tf.cast(tf.floor((f + 1.0) / 2.0 * mu + 0.5), tf.int32)
  x = np.clip(np.asarray(audio, np.float64), -1.0, 1.0)
  f = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
  return np.floor((f + 1.0) / 2.0 * mu + 0.5).astype(np.int32)


def mu_law_decode(tokens, levels: int = 256):
  """Inverse of `mu_law_encode`: tokens back to audio in [-1, 1].

  Args:
    tokens: int NumPy array or tf.Tensor in [0, levels - 1].
    levels: number of tokens used when encoding.

  Returns:
    float32 audio of the same shape (NumPy for NumPy input, else tf.Tensor).
  """
  mu = float(levels - 1)
  if isinstance(tokens, (tf.Tensor, tf.Variable)):
    f = 2.0 * tf.cast(tokens, tf.float32) / mu - 1.0
    return tf.sign(f) * (tf.pow(1.0 + mu, tf.abs(f)) - 1.0) / mu
  f = 2.0 * np.asarray(tokens, np.float64) / mu - 1.0
  return (np.sign(f) * ((1.0 + mu)**np.abs(f) - 1.0) / mu).astype(np.float32)


# ---------------------------------------------------------------------------
# Streams (text, audio): positional split and next-token windows


def split_bounds(n: int) -> tuple[int, int]:
  """Ends of the train and validation parts of an `n`-token stream.

  Args:
    n: stream length.

  Returns:
    `(train_end, validation_end)`: train is `[0, train_end)`, validation is
    `[train_end, validation_end)`, the rest is the held-out test part. For
    enwik8 (n = 10^8) this is the paper's 90M / 5M / 5M split.
  """
  return n * TRAIN_PERCENT // 100, n * (TRAIN_PERCENT + VALIDATION_PERCENT) // 100


def min_stream_length(seq_len: int) -> int:
  """Shortest stream whose train and validation parts each hold one window.

  Args:
    seq_len: model sequence length (a window is seq_len + 1 tokens).

  Returns:
    The smallest stream length n that `split_bounds` splits into train and
    validation parts of at least `seq_len + 1` tokens.
  """
  n = max(0, 100 * (seq_len + 1) // VALIDATION_PERCENT - 100)
  while True:
    train_end, validation_end = split_bounds(n)
    if min(train_end, validation_end - train_end) >= seq_len + 1:
      return n
    n += 1


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts a stream into non-overlapping windows of `seq_len + 1` tokens.

  Args:
    tokens: 1-D array; a trailing part shorter than a window is dropped.
    seq_len: model sequence length.

  Returns:
    `[num_windows, seq_len + 1]` array with the dtype of `tokens`.
  """
  count = len(tokens) // (seq_len + 1)
  return tokens[:count * (seq_len + 1)].reshape(count, seq_len + 1)  # (N, L + 1)


def _shifted_pairs(w: tf.Tensor):
  w = tf.cast(w, tf.int32)  # (L + 1,)
  return w[:-1], w[1:]  # (L,), (L,)


def _window_dataset(tokens: np.ndarray, seq_len: int) -> tuple[tf.data.Dataset, int]:
  w = windows(tokens, seq_len)  # (N, L + 1), kept narrow (uint8) until the map
  ds = tf.data.Dataset.from_tensor_slices(w).map(_shifted_pairs,
                                                 num_parallel_calls=tf.data.AUTOTUNE,
                                                 deterministic=True)
  return ds, len(w)


def stream_data(name: str, kind: str, tokens: np.ndarray, vocab_size: int,
                seq_len: Optional[int], what: str) -> TokenData:
  """Splits a token stream 90/5/5 and windows its train and validation parts.

  Args:
    name: dataset spec, for `TokenData.name`.
    kind: "text" or "audio".
    tokens: 1-D integer stream.
    vocab_size: number of token values.
    seq_len: model sequence length, None for `DEFAULT_TEXT_SEQ_LEN`.
    what: how to name the source in errors, e.g. "text file /x".

  Returns:
    TokenData with `image_shape` and `bos` None.

  Raises:
    DataError: when train or validation is shorter than one window.
  """
  seq_len = DEFAULT_TEXT_SEQ_LEN if seq_len is None else seq_len
  train_end, validation_end = split_bounds(len(tokens))
  if min(train_end, validation_end - train_end) < seq_len + 1:
    raise DataError(f"{what} is too short: {len(tokens)} tokens, but seq_len={seq_len} "
                    f"needs at least {min_stream_length(seq_len)} (so that the 5% "
                    f"validation part holds one window of seq_len+1); use a longer "
                    f"source or a smaller --seq_len")
  return windowed_data(name, kind, tokens[:train_end], tokens[train_end:validation_end],
                       vocab_size, seq_len)


def windowed_data(name: str, kind: str, train: np.ndarray, validation: np.ndarray,
                  vocab_size: int, seq_len: int) -> TokenData:
  """TokenData of next-token windows (`windows`) of a train and a validation stream."""
  train_ds, num_train = _window_dataset(train, seq_len)
  validation_ds, num_validation = _window_dataset(validation, seq_len)
  return TokenData(name=name, kind=kind, unit=UNITS[kind], vocab_size=vocab_size,
                   seq_len=seq_len, train=train_ds, validation=validation_ds, image_shape=None,
                   bos=None, num_train_examples=num_train, num_validation_examples=num_validation)


# What a path is when it is not a regular file, by `stat` file type test.
NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def read_regular_file(path: str, what: str) -> bytes:
  """The bytes of the regular file `path` (or of the file a symbolic link there names).

  Its type is checked before it is opened, so a FIFO (whose opening waits for a
  writer), socket, device or directory is never read, and it is opened
  non-blocking and checked again (in case it was replaced in between).

  Args:
    path: the file.
    what: how errors name it, e.g. "text file".

  Raises:
    DataError: naming `path`: missing, a broken symbolic link, not a regular
      file, or unreadable.
  """
  try:
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
      fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
      with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
          return f.read()
  except FileNotFoundError:
    if os.path.islink(path):
      raise DataError(f"{what} {path} is a broken symbolic link (to "
                      f"{os.readlink(path)})") from None
    raise DataError(f"{what} not found: {path}") from None
  except OSError as e:
    raise DataError(f"cannot read {what} {path}: {e.strerror}") from None
  kind = next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")
  raise DataError(f"{what} {path} is {kind}, not a regular file")


def pydoc_bytes() -> bytes:
  """Python's bundled help topics as UTF-8 bytes, topics sorted by key."""
  from pydoc_data.topics import topics
  return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_pydoc(seq_len: Optional[int]) -> TokenData:
  """Byte-level text of `pydoc_data.topics` (always available, ~0.47 MB)."""
  tokens = np.frombuffer(pydoc_bytes(), np.uint8)
  return stream_data("pydoc", "text", tokens, 256, seq_len, "pydoc text")


def load_text(path: str, seq_len: Optional[int]) -> TokenData:
  """A local file as bytes, split by position (enwik8, 10^8 bytes: the paper's
  90M/5M/5M split); a folder's files or a glob's, split by file (`split_files`)."""
  root, relative = text_files(path)
  if len(relative) > 1:
    what = f"the {len(relative)} files of text:{path}"
    return files_data(f"text:{path}", file_split_bytes(root, relative), seq_len, what)
  file = os.path.join(root, relative[0])
  tokens = np.frombuffer(read_regular_file(file, "text file"), np.uint8)
  return stream_data(f"text:{path}", "text", tokens, 256, seq_len, f"text file {file}")


# ---------------------------------------------------------------------------
# Collections of files (pystdlib, text:DIR, text:GLOB): a split by file

FILE_SEPARATOR = b"\x1c"  # ASCII "file separator" (FS): after every file's bytes
GLOB_CHARS = "*?["        # a text: path holding one of these (and naming nothing) is a glob


def split_files(names: list, sizes: list) -> tuple[list, list, list]:
  """Splits a collection of files 90 / 5 / 5 by bytes, whole files only.

  The files are put in an order that depends only on their names (the SHA-256
  of each name, ties by name), so neither the order a listing gave nor the
  alphabet decides which files are held out, and a file keeps its split when
  others are added. Walking that order, a file goes to the part in which its
  middle byte falls when the collection's bytes are cut 90% / 5% / 5%
  (`split_bounds`), so no file straddles two parts and equal-sized files
  split exactly 90/5/5 by count.

  Args:
    names: the files' relative paths (unique strings).
    sizes: their sizes in bytes, in the same order (FILE_SEPARATOR not counted).

  Returns:
    `(train, validation, test)`: the indices into `names` of each part, each
    sorted by name (the order their bytes are concatenated in).
  """
  def key(i):
    return hashlib.sha256(names[i].encode("utf-8", "surrogateescape")).digest(), names[i]

  total = sum(sizes)
  train_end, validation_end = split_bounds(2 * total)     # in half-bytes: middles are exact
  parts, start = ([], [], []), 0
  for i in sorted(range(len(names)), key=key):
    middle = 2 * start + sizes[i]
    parts[0 if middle < train_end else 1 if middle < validation_end else 2].append(i)
    start += sizes[i]
  return tuple(sorted(part, key=lambda i: names[i]) for part in parts)


def _is_regular(path: str) -> bool:
  """A regular file, or a symbolic link to one (a FIFO, socket, device, folder or broken
  link is not)."""
  try:
    return stat.S_ISREG(os.stat(path).st_mode)
  except OSError:
    return False


def files_below(directory: str, suffix: str = "", skip_dirs: tuple = ()) -> list:
  """The regular files below `directory`, as sorted relative POSIX paths.

  Args:
    directory: the folder to walk (symbolic links to folders are not followed).
    suffix: keep only names ending in it, e.g. ".py" ("" keeps all).
    skip_dirs: names of folders not to enter, e.g. ("site-packages",).

  Raises:
    DataError: `directory` cannot be listed.
  """
  found = []

  def fail(e):
    raise DataError(f"cannot list {e.filename}: {e.strerror}")

  for folder, dirs, files in os.walk(directory, onerror=fail):
    dirs[:] = [d for d in dirs if d not in skip_dirs]
    for name in files:
      path = os.path.join(folder, name)
      if name.endswith(suffix) and _is_regular(path):
        found.append(os.path.relpath(path, directory).replace(os.sep, "/"))
  return sorted(found)


def files_data(name: str, parts: tuple, seq_len: Optional[int], what: str) -> TokenData:
  """Windows the train and validation parts of a file collection (`file_split_bytes`).

  Args:
    name: dataset spec, for `TokenData.name`.
    parts: `(train, validation, test)` uint8 streams.
    seq_len: model sequence length, None for `DEFAULT_TEXT_SEQ_LEN`.
    what: how to name the collection in errors.

  Raises:
    DataError: a train or validation part shorter than one window.
  """
  seq_len = DEFAULT_TEXT_SEQ_LEN if seq_len is None else seq_len
  for part, label in ((parts[0], "train"), (parts[1], "validation")):
    if len(part) < seq_len + 1:
      raise DataError(f"{what}: the {label} part is too short, {len(part)} bytes (the files "
                      f"are split whole, about 90/5/5 by bytes), but seq_len={seq_len} needs "
                      f"{seq_len + 1}: use more files or a smaller --seq_len")
  return windowed_data(name, "text", parts[0], parts[1], 256, seq_len)


def file_split_bytes(root: str, relative: list) -> tuple[np.ndarray, ...]:
  """The train, validation and test parts of a file collection as uint8 streams.

  Args:
    root: the folder below which the files are.
    relative: their paths relative to `root` (read as bytes, whatever their
      encoding).

  Returns:
    `(train, validation, test)` uint8 arrays: each part's files (`split_files`)
    in name order, each followed by FILE_SEPARATOR.

  Raises:
    DataError: a file that cannot be read, named.
  """
  contents = [read_regular_file(os.path.join(root, r), "file") for r in relative]
  return tuple(np.frombuffer(b"".join(contents[i] + FILE_SEPARATOR for i in part), np.uint8)
               for part in split_files(relative, [len(c) for c in contents]))


def stdlib_files() -> tuple[str, list]:
  """The standard library's source: `(root, sorted relative paths of its *.py files)`.

  The root is `sysconfig.get_paths()["stdlib"]`; every regular `*.py` file below
  it, its tests included, site-packages and dist-packages excluded.
  """
  root = sysconfig.get_paths()["stdlib"]
  return root, files_below(root, ".py", skip_dirs=("site-packages", "dist-packages"))


def pystdlib_bytes() -> tuple[np.ndarray, ...]:
  """The pystdlib dataset's `(train, validation, test)` byte streams (`file_split_bytes`);
  the test part is served by nothing else (a benchmark may hold it out itself)."""
  root, relative = stdlib_files()
  if not relative:
    raise DataError(f"no *.py files below the standard library folder {root}")
  return file_split_bytes(root, relative)


def load_pystdlib(seq_len: Optional[int]) -> TokenData:
  """The running Python's standard library source as bytes (~30 MB), split by file."""
  return files_data("pystdlib", pystdlib_bytes(), seq_len, "the standard library's files")


def text_files(path: str) -> tuple[str, list]:
  """What `text:PATH` names: `(root, paths relative to root)`.

  A folder: its regular files (`files_below`, all of them). A glob (a path that
  names nothing and holds one of GLOB_CHARS; `**` matches folders recursively):
  the regular files it matches (folders and other entries it matches are
  skipped), relative to their deepest common folder. Anything else: the file
  itself, `("", [path])`.

  Raises:
    DataError: no file matched, a folder without files, or a path that is missing.
  """
  if os.path.isdir(path):
    relative = files_below(path)
    if not relative:
      raise DataError(f"text directory {path} holds no regular files")
    return path, relative
  if any(c in path for c in GLOB_CHARS) and not os.path.lexists(path):
    matches = sorted(p for p in glob.glob(path, recursive=True) if _is_regular(p))
    if not matches:
      raise DataError(f"no regular files match the text glob {path}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in matches])
    return root, [os.path.relpath(os.path.abspath(p), root) for p in matches]
  return "", [path]   # one file (whether it exists is read_regular_file's to say)


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """Decodes one 16-bit PCM WAV file to mono.

  Returns:
    `(audio, rate)`: float32 `[samples]` in [-1, 1], channels averaged, and the
    sample rate.

  Raises:
    DataError: naming `path`: not a readable regular file (see
      `read_regular_file`) or not a 16-bit PCM WAV file.
  """
  contents = read_regular_file(path, "WAV file")
  if contents[:4] != b"RIFF" or contents[8:12] != b"WAVE":
    raise DataError(f"cannot decode {path}: not a WAV file (its first bytes are not a "
                    f"RIFF/WAVE header; 16-bit PCM WAV expected)")
  try:
    audio, rate = tf.audio.decode_wav(contents)  # (S, C), ()
  except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as e:
    # TF's message may quote the file's bytes; as a UnicodeDecodeError it names no file.
    raw = e.object if isinstance(e, UnicodeDecodeError) else e.message.encode()
    reason = raw.decode("utf-8", "backslashreplace").split("}} ")[-1].split(" [Op:")[0]
    raise DataError(f"cannot decode {path} (16-bit PCM WAV expected): "
                    f"{(reason.splitlines() or [''])[0]}") from None
  return tf.reduce_mean(audio, axis=-1).numpy(), int(rate)  # (S,)


def wav_names(directory: str) -> list:
  """The names of the *.wav entries of `directory`, sorted (a DataError if it is no folder)."""
  if not os.path.lexists(directory):
    raise DataError(f"wav directory not found: {directory}")
  if not os.path.isdir(directory):
    raise DataError(f"wav:DIR needs a folder of WAV files: {directory} is not a folder")
  try:
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".wav"))
  except OSError as e:
    raise DataError(f"cannot list the wav directory {directory}: {e.strerror}") from None
  if not names:
    raise DataError(f"no .wav files in {directory}")
  return names


def read_wav_dir(directory: str) -> np.ndarray:
  """Decodes every *.wav in `directory` (sorted) to one mono float stream.

  Args:
    directory: folder holding 16-bit PCM WAV files.

  Returns:
    float32 `[total_samples]` in [-1, 1], files concatenated in name order.

  Raises:
    DataError: no such folder, no WAV files, an entry named *.wav that is not a
      readable regular file (a folder, FIFO, socket, device or broken symbolic
      link: none is opened), an undecodable file, or files with different
      sample rates.
  """
  return _decode_wav_dir(directory)[0]


def _decode_wav_dir(directory: str) -> tuple[np.ndarray, int]:
  """`read_wav_dir`'s stream and the files' common sample rate."""
  parts, rates = [], {}
  for fname in wav_names(directory):
    audio, rates[fname] = read_wav(os.path.join(directory, fname))  # (S,)
    parts.append(audio)
  if len(set(rates.values())) > 1:
    raise DataError(f"wav files in {directory} have different sample rates {rates}; "
                    f"resample them to one rate")
  return np.concatenate(parts), next(iter(rates.values()))  # (total,), ()


def wav_sample_rate(directory: str) -> int:
  """The sample rate of the first WAV file in directory (all share it: read_wav_dir checks)."""
  return read_wav(os.path.join(directory, wav_names(directory)[0]))[1]


def load_wav(directory: str, seq_len: Optional[int]) -> TokenData:
  """WAV files as one 8-bit µ-law stream (vocab 256, no BOS)."""
  samples, rate = _decode_wav_dir(directory)  # (total,), ()
  tokens = mu_law_encode(samples).astype(np.uint8)  # (total,)
  data = stream_data(f"wav:{directory}", "audio", tokens, 256, seq_len, f"audio in {directory}")
  return dataclasses.replace(data, sample_rate=rate)


# ---------------------------------------------------------------------------
# Images: raster-order pixels after a BOS token


def _check_image_seq_len(name: str, seq_len: Optional[int], length: int) -> int:
  if seq_len is not None and seq_len != length:
    raise DataError(f"{name} images are sequences of {length} tokens: got seq_len={seq_len}, "
                    f"pass seq_len={length} or leave it unset")
  return length


def image_pairs(pixels: tf.Tensor, bos: int):
  """Next-pixel pairs of one image.

  Args:
    pixels: `[H, W, C]` or flat integer pixels.
    bos: start token put before the first pixel.

  Returns:
    `(x, y)` int32 `[H * W * C]`: `y` the pixels in raster order (channels
    innermost), `x` the same shifted right by one after `bos`.
  """
  y = tf.reshape(tf.cast(pixels, tf.int32), [-1])  # (T,)
  x = tf.concat([tf.constant([bos], tf.int32), y[:-1]], axis=0)  # (T,)
  return x, y


def load_digits(seq_len: Optional[int]) -> TokenData:
  """scikit-learn's 1797 bundled 8x8 digits, 17 grey levels; split 90/10."""
  from sklearn.datasets import load_digits as sklearn_digits
  seq_len = _check_image_seq_len("digits", seq_len, 64)
  pixels = sklearn_digits().data.astype(np.int32)  # (1797, 64), values 0..16
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(pixels))
  num_train = int(len(pixels) * DIGITS_TRAIN_FRACTION)
  bos = 17

  def make(rows):
    return tf.data.Dataset.from_tensor_slices(pixels[rows]).map(lambda p: image_pairs(p, bos))

  return TokenData(name="digits", kind="image", unit=UNITS["image"], vocab_size=18,
                   seq_len=seq_len, train=make(order[:num_train]),
                   validation=make(order[num_train:]),
                   image_shape=(8, 8, 1), bos=bos, num_train_examples=num_train,
                   num_validation_examples=len(pixels) - num_train)


def _tfds_not_found(name: str, data_dir: Optional[str], root: str) -> DataError:
  """The one-line error for a TFDS dataset that is not prepared where it was looked for.

  Args:
    name: the TFDS name, e.g. "cifar10" or "downsampled_imagenet/64x64".
    data_dir: the --data_dir given, or None (TFDS's default data dir).
    root: the data dir TFDS looked in (`builder.data_dir_root`).
  """
  folder = name.split("/")[0]   # what `tfds build` writes under its data dir
  if data_dir:
    what = (f"no prepared {folder}/ in it" if os.path.isdir(data_dir) else
            "it is a file, not a folder" if os.path.exists(data_dir) else "no such folder")
    return DataError(
        f"tfds dataset {name} not found in the given data dir {data_dir} ({what}; nothing "
        f"is downloaded here): on a machine with network access run `tfds build {name} "
        f"--data_dir=DIR` (the command of pip's tensorflow-datasets) and copy DIR/{folder} "
        f"into {data_dir}")
  return DataError(
      f"tfds dataset {name} not found in the default TFDS data dir {root} ($TFDS_DATA_DIR, "
      f"else ~/tensorflow_datasets; nothing is downloaded here): on a machine with network "
      f"access run `tfds build {name}` (the command of pip's tensorflow-datasets), then copy "
      f"the {folder} folder it writes in ~/tensorflow_datasets into {root} here, or into any "
      f"folder and pass --data_dir=FOLDER")


def load_tfds(name: str, seq_len: Optional[int], data_dir: Optional[str],
              seed: int) -> TokenData:
  """A prepared TFDS image dataset; 256 pixel values plus BOS = 256.

  Args:
    name: one of `TFDS_IMAGES`.
    seq_len: None or H * W * C.
    data_dir: TFDS data dir, None for TFDS's default.
    seed: seed of the training file order.

  Returns:
    TokenData; train is the "train" split, validation the test split (the
    "validation" split for downsampled ImageNet).

  Raises:
    DataError: unknown name, wrong seq_len, or data not prepared in data_dir.
  """
  import tensorflow_datasets as tfds
  if name not in TFDS_IMAGES:
    raise DataError(f"unsupported tfds dataset {name!r}: supported are "
                    f"{', '.join('tfds:' + n for n in TFDS_IMAGES)}")
  height, width, channels, eval_split = TFDS_IMAGES[name]
  seq_len = _check_image_seq_len(name, seq_len, height * width * channels)
  bos = 256

  def split(split_name, shuffle_files):
    try:
      ds = tfds.load(name, split=split_name, data_dir=data_dir, download=False,
                     shuffle_files=shuffle_files,
                     read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError:
      # tfds raises a bare AssertionError ("could not find data in ...") when the
      # dataset is registered but not prepared; anything else is re-raised.
      builder = tfds.builder(name, data_dir=data_dir)
      if not builder.is_prepared():
        raise _tfds_not_found(name, data_dir, os.fspath(builder.data_dir_root)) from None
      raise
    count = int(ds.cardinality())
    if count < 0:  # unknown: the split metadata has it
      count = tfds.builder(name, data_dir=data_dir).info.splits[split_name].num_examples
    ds = ds.map(lambda ex: image_pairs(ex["image"], bos), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=not shuffle_files)
    return ds, count

  train, num_train = split("train", shuffle_files=True)
  validation, num_validation = split(eval_split, shuffle_files=False)
  return TokenData(name=f"tfds:{name}", kind="image", unit=UNITS["image"], vocab_size=257,
                   seq_len=seq_len, train=train, validation=validation,
                   image_shape=(height, width, channels), bos=bos,
                   num_train_examples=num_train, num_validation_examples=num_validation)


# ---------------------------------------------------------------------------
# Entry points


def load(spec: str, seq_len: Optional[int], data_dir: Optional[str] = None,
         seed: int = 0) -> TokenData:
  """Loads a dataset by spec; see the module docstring for the forms.

  Args:
    spec: one of SPEC_FORMS: "pydoc", "pystdlib", "text:PATH", "digits",
      "tfds:NAME" or "wav:DIR".
    seq_len: model sequence length; None picks 256 for text and audio, the
      pixel count for images (images accept only that).
    data_dir: TFDS data dir (tfds specs only).
    seed: seed of the TFDS training file order; the splits never depend on it.

  Returns:
    TokenData.

  Raises:
    DataError: unknown spec, bad seq_len, or missing / unusable data.
  """
  if seq_len is not None and seq_len < 2:
    raise DataError(f"seq_len must be at least 2, got {seq_len}")
  kind, _, arg = spec.partition(":")
  if spec == "pydoc":
    return load_pydoc(seq_len)
  if spec == "pystdlib":
    return load_pystdlib(seq_len)
  if spec == "digits":
    return load_digits(seq_len)
  if kind == "text" and arg:
    return load_text(arg, seq_len)
  if kind == "wav" and arg:
    return load_wav(arg, seq_len)
  if kind == "tfds" and arg:
    return load_tfds(arg, seq_len, data_dir, seed)
  raise DataError(f"unknown dataset {spec!r}: use one of {', '.join(SPEC_FORMS)}")


def make_batches(ds: tf.data.Dataset, batch_size: int, shuffle: bool, seed: Optional[int],
                 drop_remainder: bool, buffer_size: Optional[int] = None) -> tf.data.Dataset:
  """Shuffles (optionally), batches and prefetches `(x, y)` pairs.

  Args:
    ds: unbatched dataset, e.g. `TokenData.train`.
    batch_size: examples per batch.
    shuffle: shuffle through a buffer, in one seeded order that every
      iterator repeats (so a strategy that opens the dataset twice, or a
      resumed run, sees the same batches).
    seed: shuffle seed (None: nondeterministic).
    drop_remainder: drop a last, smaller batch (static batch shape).
    buffer_size: shuffle buffer in examples; None keeps it under
      `SHUFFLE_BUFFER_BYTES` and `MAX_SHUFFLE_BUFFER`, and no larger than `ds`.

  Returns:
    Dataset of `(x, y)` int32 `[batch, seq_len]`.
  """
  if shuffle:
    if buffer_size is None:
      example_bytes = sum(s.shape.num_elements() * s.dtype.size
                          for s in tf.nest.flatten(ds.element_spec))
      buffer_size = max(1, min(MAX_SHUFFLE_BUFFER, SHUFFLE_BUFFER_BYTES // example_bytes))
      count = int(ds.cardinality())
      if count > 0:
        buffer_size = min(buffer_size, count)
    ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)
  return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
