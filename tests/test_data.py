"""Data module: splits, next-token pairs, image raster order, µ-law, errors."""

from concurrent import futures
import os
import pathlib
import socket

import numpy as np
import pytest
import tensorflow as tf

from sparse_attention_tf import data


def as_arrays(ds):
  """All `(x, y)` pairs of an unbatched dataset as two `[N, T]` arrays."""
  pairs = list(ds.as_numpy_iterator())
  return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])


def reference_mu_law(x, mu=255.0):
  """Textbook µ-law in float64, independent of the module."""
  f = np.sign(x) * np.log(1.0 + mu * np.abs(x)) / np.log(1.0 + mu)
  tokens = np.floor((f + 1.0) / 2.0 * mu + 0.5).astype(np.int64)
  decode = lambda t: np.sign(2 * t / mu - 1) * ((1 + mu)**np.abs(2 * t / mu - 1) - 1) / mu
  return tokens, decode


# ----------------------------------------------------------------- pydoc / text


def test_pydoc_shapes_shift_and_determinism():
  d = data.load("pydoc", seq_len=None)
  assert (d.kind, d.vocab_size, d.seq_len, d.bos, d.image_shape) == ("text", 256, 256, None, None)
  assert d.train.element_spec == (tf.TensorSpec([256], tf.int32),) * 2
  x, y = as_arrays(d.validation)  # (N, 256)
  assert x.shape == (d.num_validation_examples, 256)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  raw = np.frombuffer(data.pydoc_bytes(), np.uint8)
  n = len(raw)
  assert 400_000 < n < 600_000
  assert d.num_train_examples == (n * 9 // 10) // 257
  # Train windows tile bytes [0, 257 * N_train) inside the first 90%; validation
  # windows tile the bytes right after it: disjoint ranges.
  tx, ty = as_arrays(d.train)
  np.testing.assert_array_equal(np.concatenate([tx, ty[:, -1:]], 1).ravel(),
                                raw[:257 * len(tx)])
  start = n * 9 // 10
  assert 257 * len(tx) <= start
  np.testing.assert_array_equal(x[0], raw[start:start + 256])
  np.testing.assert_array_equal(y[-1], raw[start + 257 * len(x) - 256:start + 257 * len(x)])
  # Same data when loaded again.
  x2, y2 = as_arrays(data.load("pydoc", seq_len=None).validation)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)


def test_text_exact_windows_and_disjoint_splits(tmp_path):
  path = tmp_path / "t.bin"
  raw = np.arange(1000, dtype=np.int64) % 251  # bytes that never repeat within 251
  path.write_bytes(raw.astype(np.uint8).tobytes())
  d = data.load(f"text:{path}", seq_len=9)
  tx, ty = as_arrays(d.train)  # (90, 9)
  vx, vy = as_arrays(d.validation)  # (5, 9)
  assert (d.num_train_examples, d.num_validation_examples) == (90, 5)
  assert tx.shape == (90, 9) and vx.shape == (5, 9)
  windows = raw[:900].reshape(90, 10)
  np.testing.assert_array_equal(tx, windows[:, :-1])
  np.testing.assert_array_equal(ty, windows[:, 1:])
  np.testing.assert_array_equal(vx, raw[900:950].reshape(5, 10)[:, :-1])
  np.testing.assert_array_equal(vy, raw[900:950].reshape(5, 10)[:, 1:])
  # So train covers bytes [0, 900), validation [900, 950), and the held-out
  # test part [950, 1000) is served nowhere.


def test_text_errors(tmp_path):
  with pytest.raises(data.DataError, match="text file not found: .*nope"):
    data.load(f"text:{tmp_path / 'nope'}", seq_len=8)
  short = tmp_path / "short.txt"
  short.write_bytes(b"x" * 100)  # validation part is 5 bytes
  with pytest.raises(data.DataError, match=r"too short: 100 tokens.*at least (\d+)") as e:
    data.load(f"text:{short}", seq_len=8)
  need = int(str(e.value).split("at least ")[1].split()[0])
  assert need == data.min_stream_length(8)
  short.write_bytes(b"x" * need)
  data.load(f"text:{short}", seq_len=8)  # exactly long enough
  short.write_bytes(b"x" * (need - 1))
  with pytest.raises(data.DataError, match="too short"):
    data.load(f"text:{short}", seq_len=8)


def make_fifo(path):
  os.mkfifo(path)
  return path


def make_socket(path):
  s = socket.socket(socket.AF_UNIX)
  s.bind(str(path))
  s.close()   # the socket file stays
  return path


NOT_FILES = {   # how to make a path that is no regular file, and what the error calls it
    "directory": (lambda p: p.mkdir(), "is a directory, not a regular file"),
    "fifo": (make_fifo, "is a FIFO (named pipe), not a regular file"),
    "socket": (make_socket, "is a socket, not a regular file"),
    "broken_symlink": (lambda p: p.symlink_to(p.parent / "gone"), "is a broken symbolic link"),
}


def run_with_timeout(fn, seconds=20):
  """fn() in a thread; fails the test if it blocks (a FIFO opened for reading waits for a
  writer forever)."""
  with futures.ThreadPoolExecutor(1) as pool:
    job = pool.submit(fn)
    try:
      return job.result(timeout=seconds)
    except futures.TimeoutError:
      # unblock it: a writer lets a waiting open() on a FIFO return
      for path in getattr(fn, "fifos", ()):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      pytest.fail(f"blocked for {seconds} s")


@pytest.mark.parametrize("kind", sorted(set(NOT_FILES) - {"directory"}))   # a folder: below
def test_text_path_that_is_no_regular_file(tmp_path, kind):
  """text:PATH on a directory, FIFO, socket or broken link: an error naming the path and what
  it is, never a hang on the FIFO."""
  make, words = NOT_FILES[kind]
  path = tmp_path / "corpus.txt"
  make(path)
  load = lambda: data.load(f"text:{path}", seq_len=8)
  load.fifos = [path] if kind == "fifo" else []
  with pytest.raises(data.DataError) as e:
    run_with_timeout(load)
  assert str(e.value).startswith(f"text file {path} {words}"), str(e.value)


@pytest.mark.parametrize("spec,kind,unit", [
    ("pydoc", "text", "bits_per_byte"),
    ("text:{tmp}/t.txt", "text", "bits_per_byte"),
    ("digits", "image", "bits_per_dim"),
    ("wav:{tmp}", "audio", "bits_per_sample"),
])
def test_unit_names_what_a_token_is(tmp_path, spec, kind, unit):
  """Every dataset carries the name of its bits-per-token metric: bytes, pixel
  channels (dims) or µ-law samples."""
  (tmp_path / "t.txt").write_bytes(b"abc" * 1000)
  write_wav(tmp_path / "a.wav", np.zeros((2000, 1)))
  d = data.load(spec.format(tmp=tmp_path), seq_len=64 if kind == "image" else 16)
  assert (d.kind, d.unit) == (kind, unit)
  assert data.UNITS[kind] == unit


# ------------------------------------------------ file collections: pystdlib, text:DIR/GLOB


def independent_stdlib_listing():
  """The stdlib's *.py files, listed here with pathlib (not the module's walker)."""
  import sysconfig
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = set()
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if {"site-packages", "dist-packages"} & set(rel.parts[:-1]):
      continue
    if any((root / pathlib.Path(*rel.parts[:k])).is_symlink() for k in range(1, len(rel.parts))):
      continue   # rglob does not follow folder links either (3.11); stay safe if it does
    if path.is_file():   # regular, or a link to one
      found.add(rel.as_posix())
  return root, found


@pytest.fixture(scope="module")
def pystdlib_parts():
  return data.pystdlib_bytes()


def split_by_separator(stream):
  """The files of one part: FILE_SEPARATOR ends each (source files hold no 0x1C byte)."""
  raw = stream.tobytes()
  assert raw.endswith(data.FILE_SEPARATOR)
  return raw.split(data.FILE_SEPARATOR)[:-1]


def test_pystdlib_split_covers_every_file_once_and_is_deterministic(pystdlib_parts):
  root, listed = independent_stdlib_listing()
  assert len(listed) > 100
  contents = {rel: (root / rel).read_bytes() for rel in listed}
  assert not any(data.FILE_SEPARATOR in c for c in contents.values())
  assert data.stdlib_files()[1] == sorted(listed)
  # The split of the independent listing: every file in exactly one part; each part's
  # stream is exactly its files, read here, in sorted order, each followed by 0x1C.
  names = sorted(listed)
  split = data.split_files(names, [len(contents[n]) for n in names])
  parts = []
  for stream, indices in zip(pystdlib_parts, split):
    part = sorted(names[i] for i in indices)
    assert stream.tobytes() == b"".join(contents[n] + data.FILE_SEPARATOR for n in part)
    assert len(split_by_separator(stream)) == len(part)
    parts.append(set(part))
  assert sum(len(p) for p in parts) == len(names)
  train, validation, test = parts
  assert not (train & validation or train & test or validation & test)
  assert train | validation | test == listed
  total = sum(len(c) for c in contents.values())
  sizes = [sum(len(contents[n]) for n in part) / total for part in parts]
  assert 0.85 < sizes[0] < 0.95 and 0.02 < sizes[1] < 0.08 and 0.02 < sizes[2] < 0.08, sizes
  # Deterministic: another load gives the same bytes.
  for a, b in zip(pystdlib_parts, data.pystdlib_bytes()):
    np.testing.assert_array_equal(a, b)


def test_pystdlib_load_windows_train_and_validation(pystdlib_parts):
  d = data.load("pystdlib", seq_len=4096)
  assert (d.name, d.kind, d.unit, d.vocab_size, d.seq_len) == (
      "pystdlib", "text", "bits_per_byte", 256, 4096)
  train, validation, _ = pystdlib_parts
  assert d.num_train_examples == len(train) // 4097
  assert d.num_validation_examples == len(validation) // 4097
  x, y = next(iter(d.validation.skip(1)))
  np.testing.assert_array_equal(x, validation[4097:4097 + 4096])
  np.testing.assert_array_equal(y, validation[4098:4098 + 4096])


def write_tree(root, files):
  for rel, contents in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(contents)


def test_split_files_is_whole_files_about_90_5_5_and_order_free():
  rng = np.random.default_rng(0)
  names = [f"pkg{i % 7}/mod{i}.py" for i in range(500)]
  sizes = [int(s) for s in rng.integers(1, 5000, 500)]
  parts = data.split_files(names, sizes)
  assert sorted(i for p in parts for i in p) == list(range(500))
  for p in parts:
    assert [names[i] for i in p] == sorted(names[i] for i in p)
  total = sum(sizes)
  share = [sum(sizes[i] for i in p) / total for p in parts]
  assert abs(share[0] - 0.90) < 0.02 and abs(share[1] - 0.05) < 0.02, share
  # A listing in another order splits the same files the same way.
  order = rng.permutation(500)
  shuffled = data.split_files([names[i] for i in order], [sizes[i] for i in order])
  assert [sorted(names[order[i]] for i in p) for p in shuffled] == \
      [sorted(names[i] for i in p) for p in parts]
  # Equal sizes: exactly 90/5/5 by count.
  assert [len(p) for p in data.split_files(names[:100], [10] * 100)] == [90, 5, 5]


@pytest.mark.parametrize("form", ["dir", "glob", "recursive_glob"])
def test_text_collection_split_by_file(tmp_path, form):
  corpus = tmp_path / "corpus"
  names = [f"d{i % 3}/sub{i % 2}/f{i:02d}.txt" for i in range(40)] + ["d0/other.bin"]
  # Each file: its own name, repeated (so a part's pieces say which file they are).
  write_tree(corpus, {rel: f"{rel}\n".encode() * (5 + 3 * i) for i, rel in enumerate(names)})
  pipe = corpus / "d1" / "pipe.txt"
  os.mkfifo(pipe)   # no regular file: skipped, never opened
  expected = set(names) if form == "dir" else set(names[:-1])
  path = {"dir": f"{corpus}", "glob": f"{corpus}/d*/sub*/*.txt",
          "recursive_glob": f"{corpus}/**/*.txt"}[form]
  root, relative = data.text_files(path)
  parts = data.file_split_bytes(root, relative)
  seen = []
  for part in parts:
    pieces = split_by_separator(part)
    found = [p.split(b"\n")[0].decode() for p in pieces]
    assert [(corpus / n).read_bytes() for n in found] == pieces   # whole files
    assert found == sorted(found)
    seen.append(set(found))
  assert seen[0] and seen[1] and seen[2]
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert seen[0] | seen[1] | seen[2] == expected
  # load serves the train and validation parts, windowed from their starts.
  load = lambda: data.load(f"text:{path}", seq_len=16)
  load.fifos = [pipe]
  d = run_with_timeout(load)
  for ds, part in ((d.train, parts[0]), (d.validation, parts[1])):
    x, y = as_arrays(ds)
    rejoined = np.concatenate([x, y[:, -1:]], 1).ravel()
    assert len(rejoined) == len(part) // 17 * 17
    np.testing.assert_array_equal(rejoined, part[:len(rejoined)])


def test_text_collection_of_one_file_splits_by_position(tmp_path):
  raw = (np.arange(1000) % 251).astype(np.uint8).tobytes()
  (tmp_path / "only.txt").write_bytes(raw)
  for spec in (f"text:{tmp_path}", f"text:{tmp_path}/*.txt"):
    d = data.load(spec, seq_len=9)
    assert (d.num_train_examples, d.num_validation_examples) == (90, 5)
    vx, _ = as_arrays(d.validation)
    np.testing.assert_array_equal(vx, np.frombuffer(raw, np.uint8)[900:950].reshape(5, 10)[:, :-1])


def test_text_collection_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "sub").mkdir()
  with pytest.raises(data.DataError, match=f"text directory {tmp_path / 'empty'} holds no "
                     "regular files"):
    data.load(f"text:{tmp_path / 'empty'}", seq_len=8)
  with pytest.raises(data.DataError, match="no regular files match the text glob .*nothing"):
    data.load(f"text:{tmp_path}/nothing*.txt", seq_len=8)
  with pytest.raises(data.DataError, match="no regular files match"):   # only folders match
    data.load(f"text:{tmp_path}/emp*", seq_len=8)
  write_tree(tmp_path / "two", {"a.txt": b"a" * 100, "b.txt": b"b" * 100})
  with pytest.raises(data.DataError, match="the 2 files of text:.*validation part is too short, "
                     "0 bytes.*more files or a smaller --seq_len"):
    data.load(f"text:{tmp_path / 'two'}", seq_len=8)
  if os.geteuid() != 0:   # root reads anything
    (tmp_path / "two" / "b.txt").chmod(0)
    with pytest.raises(data.DataError, match=f"cannot read file {tmp_path / 'two' / 'b.txt'}"):
      data.load(f"text:{tmp_path / 'two'}", seq_len=8)


def test_enwik8_split_is_papers():
  assert data.split_bounds(100_000_000) == (90_000_000, 95_000_000)


@pytest.mark.parametrize("spec,seq_len,match", [
    ("pydoc", 1, "at least 2"),
    ("imagenet", None,
     "unknown dataset 'imagenet'.*pydoc, pystdlib, text:PATH, digits, tfds:NAME, wav:DIR"),
    ("text:", None, "unknown dataset"),
    ("tfds:svhn_cropped", None, "unsupported tfds dataset 'svhn_cropped'.*tfds:cifar10"),
])
def test_bad_specs(spec, seq_len, match):
  with pytest.raises(data.DataError, match=match):
    data.load(spec, seq_len=seq_len)


# ----------------------------------------------------------------------- images


def test_digits():
  d = data.load("digits", seq_len=64)
  assert (d.kind, d.vocab_size, d.seq_len, d.bos, d.image_shape) == ("image", 18, 64, 17, (8, 8, 1))
  assert (d.num_train_examples, d.num_validation_examples) == (1617, 180)
  tx, ty = as_arrays(d.train)
  vx, vy = as_arrays(d.validation)
  assert tx.shape == (1617, 64) and vx.shape == (180, 64)
  for x, y in ((tx, ty), (vx, vy)):
    assert (x[:, 0] == 17).all() and (x[:, 1:] < 17).all()
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert y.min() == 0 and y.max() == 16
  # The split is a fixed partition of sklearn's images.
  from sklearn.datasets import load_digits
  pixels = load_digits().data.astype(np.int32)
  order = np.random.default_rng(1234).permutation(1797)
  np.testing.assert_array_equal(ty, pixels[order[:1617]])
  np.testing.assert_array_equal(vy, pixels[order[1617:]])


def test_digits_seq_len_error():
  with pytest.raises(data.DataError, match="seq_len=32.*seq_len=64"):
    data.load("digits", seq_len=32)


def test_tfds_cifar10_mocked():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=3):
    d = data.load("tfds:cifar10", seq_len=None)
    images = np.stack([ex["image"] for ex in
                       tfds.load("cifar10", split="test", download=False).as_numpy_iterator()])
    vx, vy = as_arrays(d.validation)
  assert (d.vocab_size, d.seq_len, d.bos, d.image_shape) == (257, 3072, 256, (32, 32, 3))
  assert d.unit == "bits_per_dim"
  assert (d.num_train_examples, d.num_validation_examples) == (3, 3)
  assert vx.shape == vy.shape == (3, 3072)
  np.testing.assert_array_equal(vy, images.reshape(3, -1))  # (row, col, channel) order
  assert (vx[:, 0] == 256).all()
  np.testing.assert_array_equal(vx[:, 1:], vy[:, :-1])
  with pytest.raises(data.DataError, match="seq_len=1024.*3072"):
    data.load("tfds:cifar10", seq_len=1024)


@pytest.mark.parametrize("missing", [False, True, "file"])
def test_tfds_not_found_in_given_dir(tmp_path, missing):
  """A --data_dir was given: the message says the data is not in that folder and how
  to build it elsewhere into a folder to copy there; it does not suggest --data_dir."""
  given = str(tmp_path / "missing" if missing else tmp_path)
  if missing == "file":
    (tmp_path / "missing").write_bytes(b"")
  with pytest.raises(data.DataError) as e:
    data.load("tfds:cifar10", seq_len=None, data_dir=given)
  message = str(e.value)
  assert "\n" not in message
  assert f"cifar10 not found in the given data dir {given} (" in message
  assert {False: "no prepared cifar10/ in it", True: "no such folder",
          "file": "it is a file, not a folder"}[missing] in message
  assert "network access run `tfds build cifar10 --data_dir=DIR`" in message
  assert f"copy DIR/cifar10 into {given}" in message
  assert "pass --data_dir" not in message and "download_and_prepare" not in message


def test_tfds_not_found_in_default_dir(tmp_path, monkeypatch):
  """No --data_dir: the message names TFDS's default folder, recommends `tfds build`
  on a machine with network access, and offers --data_dir for a copy elsewhere."""
  import tensorflow_datasets as tfds
  default = tmp_path / "default_tfds"
  default.mkdir()
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(default))  # TFDS reads it per call
  with pytest.raises(data.DataError) as e:
    data.load("tfds:downsampled_imagenet/64x64", seq_len=None)
  message = str(e.value)
  assert "\n" not in message
  assert f"downsampled_imagenet/64x64 not found in the default TFDS data dir {default} (" \
      in message
  assert "network access run `tfds build downsampled_imagenet/64x64`" in message
  assert f"copy the downsampled_imagenet folder it writes in ~/tensorflow_datasets into " \
      f"{default}" in message
  assert message.endswith("pass --data_dir=FOLDER"), message


# ------------------------------------------------------------------------ audio


def write_wav(path, audio, rate=8000):
  path.write_bytes(tf.audio.encode_wav(tf.constant(audio, tf.float32), rate).numpy())


def test_mu_law_against_numpy_formula():
  x = np.concatenate([np.linspace(-1, 1, 20001), [0.0, 1e-6, -1e-6]])
  ref_tokens, ref_decode = reference_mu_law(x)
  tokens = data.mu_law_encode(x)
  assert tokens.min() == 0 and tokens.max() == 255
  # Float rounding may move a value exactly on a rounding boundary by one code.
  assert np.abs(tokens - ref_tokens).max() <= 1 and (tokens == ref_tokens).mean() > 0.999
  np.testing.assert_allclose(data.mu_law_decode(np.arange(256)), ref_decode(np.arange(256)),
                             atol=1e-6)
  # Round trip stays within the quantization step around x.
  lo, hi = ref_decode(np.maximum(tokens - 1, 0)), ref_decode(np.minimum(tokens + 1, 255))
  y = data.mu_law_decode(tokens)
  assert ((lo - 1e-6 <= x) & (x <= hi + 1e-6)).all()
  assert np.abs(y - x).max() < 0.04  # steepest step (near ±1) is ~0.043
  # TF path agrees with the NumPy path.
  np.testing.assert_array_equal(data.mu_law_encode(tf.constant(x, tf.float32)).numpy(),
                                data.mu_law_encode(x.astype(np.float32)))
  np.testing.assert_allclose(data.mu_law_decode(tf.constant(tokens)).numpy(), y, atol=1e-6)


def test_wav_dir(tmp_path):
  t = np.arange(3000) / 8000.0
  a = 0.5 * np.sin(2 * np.pi * 440 * t)  # (3000,)
  b = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.1 * np.ones_like(t)], -1)  # (3000, 2)
  write_wav(tmp_path / "b.wav", b)
  write_wav(tmp_path / "a.wav", a[:, None])
  (tmp_path / "notes.txt").write_text("ignored")
  d = data.load(f"wav:{tmp_path}", seq_len=49)
  assert (d.kind, d.vocab_size, d.seq_len, d.bos) == ("audio", 256, 49, None)
  # 6000 samples: train [0, 5400) -> 108 windows of 50, validation [5400, 5700) -> 6.
  assert (d.num_train_examples, d.num_validation_examples) == (108, 6)
  tx, ty = as_arrays(d.train)
  assert tx.shape == (108, 49)
  np.testing.assert_array_equal(tx[:, 1:], ty[:, :-1])
  # a.wav comes first (sorted), b.wav is averaged to mono.
  stream = np.concatenate([a, b.mean(-1)])  # (6000,)
  tokens = np.concatenate([tx, ty[:, -1:]], axis=1).ravel()  # (5400,)
  ref_tokens, ref_decode = reference_mu_law(stream[:5400])
  assert np.abs(tokens - ref_tokens).max() <= 1  # 16-bit WAV rounding may move a boundary
  step = ref_decode(np.minimum(ref_tokens + 1, 255)) - ref_decode(np.maximum(ref_tokens - 1, 0))
  assert (np.abs(data.mu_law_decode(tokens) - stream[:5400]) <= step).all()


def test_wav_errors(tmp_path):
  with pytest.raises(data.DataError, match="no .wav files"):
    data.load(f"wav:{tmp_path}", seq_len=8)
  with pytest.raises(data.DataError, match="wav directory not found"):
    data.load(f"wav:{tmp_path / 'missing'}", seq_len=8)
  write_wav(tmp_path / "a.wav", np.zeros((100, 1)), rate=8000)
  write_wav(tmp_path / "b.wav", np.zeros((100, 1)), rate=16000)
  with pytest.raises(data.DataError, match="different sample rates"):
    data.load(f"wav:{tmp_path}", seq_len=8)


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_wav_entry_that_is_no_regular_file(tmp_path, kind):
  """A *.wav entry that is a directory, FIFO, socket or broken link beside a good file: an
  error naming it, before it is opened (the FIFO would block)."""
  make, words = NOT_FILES[kind]
  write_wav(tmp_path / "a.wav", np.zeros((2000, 1)))
  path = tmp_path / "b.wav"
  make(path)
  load = lambda: data.load(f"wav:{tmp_path}", seq_len=8)
  load.fifos = [path] if kind == "fifo" else []
  with pytest.raises(data.DataError) as e:
    run_with_timeout(load)
  assert str(e.value).startswith(f"WAV file {path} {words}"), str(e.value)


@pytest.mark.parametrize("contents,reason", [
    (bytes(range(255, 127, -1)) * 4, "not a WAV file (its first bytes are not a RIFF/WAVE"),
    (b"RIFF\0\0\0\0WAVE\xff\xfe\xfd\xfc" + b"\x80" * 64,   # TF quotes the bytes: not UTF-8
     "(16-bit PCM WAV expected): Unexpected field \\xff\\xfe\\xfd\\xfc"),
    (b"RIFF\0\0\0\0WAVE", "(16-bit PCM WAV expected): Data too short"),
], ids=["random_bytes", "bytes_quoted_in_tf_message", "truncated"])
def test_wav_undecodable_bytes_name_the_file(tmp_path, contents, reason):
  path = tmp_path / "noise.wav"
  path.write_bytes(contents)
  with pytest.raises(data.DataError) as e:
    data.load(f"wav:{tmp_path}", seq_len=8)
  assert str(e.value).startswith(f"cannot decode {path}"), str(e.value)
  assert reason in str(e.value) and "\n" not in str(e.value) and "{{" not in str(e.value)


def test_wav_dir_that_is_a_file(tmp_path):
  (tmp_path / "a.wav").write_bytes(b"x")
  with pytest.raises(data.DataError, match="needs a folder of WAV files: .*a.wav is not a folder"):
    data.load(f"wav:{tmp_path / 'a.wav'}", seq_len=8)


# --------------------------------------------------------------------- batching


@pytest.mark.parametrize("drop_remainder,sizes", [(True, [4, 4]), (False, [4, 4, 2])])
def test_make_batches(drop_remainder, sizes):
  x = np.arange(10 * 6, dtype=np.int32).reshape(10, 6)  # (N, T)
  ds = tf.data.Dataset.from_tensor_slices((x, x + 1))
  batches = list(data.make_batches(ds, 4, shuffle=True, seed=3,
                                   drop_remainder=drop_remainder).as_numpy_iterator())
  assert [len(bx) for bx, _ in batches] == sizes
  bx = np.concatenate([b for b, _ in batches])
  by = np.concatenate([b for _, b in batches])
  np.testing.assert_array_equal(by, bx + 1)  # pairs stay together
  assert not np.array_equal(bx, x[:len(bx)])  # shuffled
  if drop_remainder:
    spec = data.make_batches(ds, 4, shuffle=False, seed=None, drop_remainder=True).element_spec
    assert spec[0].shape == (4, 6)
  else:
    np.testing.assert_array_equal(np.sort(bx, axis=0), x)  # every example once
