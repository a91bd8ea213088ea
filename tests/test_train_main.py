"""End-to-end tests of the training script `train_main.py`, run as subprocesses.

* Every offline dataset (pydoc, a text file, digits, mocked tfds:cifar10, a
  folder of WAV files) trains a tiny model: exit 0, all outputs written
  (model, checkpoint and its run_config.json, TensorBoard logs, a decodable
  sample, metrics), and the training loss goes down; the audio sample keeps
  the recordings' rate; the bits metric is named for the data's tokens
  (bits_per_byte, bits_per_dim, bits_per_sample), in metrics.json and in the
  TensorBoard scalars, which are also written every --log_every_steps steps.
* Distribution: `mirrored` on 2 logical CPUs gives the loss of `default` at
  the same global batch; `multi_worker` (two local worker processes, the
  custom tf.distribute loop) trains: both workers finish, end with the same
  weights, the chief writes the checkpoints (the last two) and the outputs,
  and the losses are those of `default` at the same global batch.
* Resume: an interrupted run continued with --resume ends exactly where an
  uninterrupted run ends, and its TensorBoard points continue at the global
  step; without --resume the run starts over; --resume with other model
  flags stops and names them; --resume without a checkpoint starts fresh.
* Bad flags and paths (an --output_dir that cannot be made, a wav: entry
  that is no file, ...): exit status 2, one `train_main.py: error:` line
  naming the problem, no traceback or hang, no output folder left behind.
  These cases all run in one process, each in a child forked after the
  import of train_main (`BAD_INPUTS_WRAPPER`), so they cost one import.

Each run is a fresh process (strategies and logical devices are process-wide
in TF). All runs are queued when the module starts and run in the background,
two at a time (`Jobs`), in an order that keeps both lanes busy to the end; each
test waits for its own runs. The resume runs that start from the first one's
checkpoint come after it in their lanes; a run several tests read is run once
(the default-strategy run is the reference of both mirrored and multi_worker;
one run of 8 kHz recordings serves the three audio tests).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "train_main.py")

# Tiny model and run: every run takes seconds.
TINY = ["--num_layers=1", "--d_model=32", "--num_heads=2", "--batch_size=4", "--seq_len=64",
        "--block_size=16", "--stride=16", "--summary=4", "--validation_steps=2", "--verbose=0",
        "--dropout=0", "--sample_tokens=16", "--log_every_steps=5"]
# Fast learning: 30 steps are enough for the training loss to drop clearly.
LEARN = ["--steps=30", "--steps_per_epoch=10", "--learning_rate=3e-3", "--warmup_steps=5"]
# Resume: two epochs of ten steps, interrupted (or not) after the first.
RESUME = TINY + ["--dataset=pydoc", "--steps=20", "--steps_per_epoch=10", "--seed=0",
                 "--learning_rate=3e-3", "--warmup_steps=5"]
# Resume with other flags: three that define the model (named in the error) and
# four that may change (not named).
OTHER_MODEL = ["--num_layers=2", "--d_model=64", "--pattern=strided", "--steps=40",
               "--dropout=0.1", "--block_size=32", "--learning_rate=1e-3"]
# The default / mirrored / multi_worker runs: the same few steps at the same global
# batch, two epochs of two steps, a TensorBoard point every 2 steps. The default run
# is the reference of both others. (Not one step: the untrained model predicts
# uniformly, so the loss of a first step is ln(256) whatever the batch, and the
# learning rate of step 0 is 0 under warm-up; steps with a learning rate exercise
# the gradients.)
FEW_STEPS = TINY + ["--dataset=pydoc", "--steps=4", "--steps_per_epoch=2", "--batch_size=4",
                    "--seed=0", "--dropout=0", "--learning_rate=3e-3", "--warmup_steps=1",
                    "--log_every_steps=2"]
TIMEOUT = 180  # seconds per process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TFDS_WRAPPER = '''\
"""Runs train_main under tfds.testing.mock_data (no network, no prepared data)."""
import sys
sys.path.insert(0, sys.argv[1])
import tensorflow_datasets as tfds
from absl import app
import train_main
with tfds.testing.mock_data(num_examples=16):
  app.run(train_main.main, argv=["train_main.py"] + sys.argv[2:])
'''

# Bad flags: (extra flags, words the error line must contain); "{tmp}" is the
# folder of the run.
BAD_FLAGS = {
    "unknown_dataset": (["--dataset=nope"], ["unknown dataset", "'nope'"]),
    "seq_len_vs_block": (["--seq_len=100", "--block_size=32"],
                         ["--seq_len (100)", "--block_size (32)", "multiple"]),
    "missing_text_file": (["--dataset=text:/does/not/exist"], ["not found", "/does/not/exist"]),
    "multi_worker_without_tf_config": (["--strategy=multi_worker"],
                                       ["--strategy=multi_worker", "TF_CONFIG"]),
    "steps_zero": (["--steps=0"], ["--steps must be >= 1, got 0."]),
    "export_version_exists": (["--export_dir={tmp}/exports"],
                              ["--export_dir: {tmp}/exports/1 already exists",
                               "--export_overwrite", "--export_version"]),
    "batch_vs_replicas": (["--strategy=mirrored", "--cpu_replicas=2", "--batch_size=3"],
                          ["--batch_size (3)", "replicas (2)"]),
    "tfds_not_prepared": (["--dataset=tfds:cifar10", "--seq_len=3072", "--block_size=64",
                           "--data_dir={tmp}/empty_tfds"],
                          ["cifar10", "not found in the given data dir {tmp}/empty_tfds",
                           "`tfds build cifar10 --data_dir=DIR`"]),
}

# Bad paths (issue 13): (extra flags, words the error line must contain). "{tmp}" is the
# data folder (see `write_bad_inputs`), "{fresh}" a folder that does not exist, which
# the run must not leave behind, "{ro}" a folder nobody can create folders in: a
# chmod 0555 folder, or /sys when the tests run as root (root ignores the mode; sysfs
# refuses mkdir to everyone). Without its own, a case's --output_dir is {fresh}/out.
BAD_INPUTS = {
    "output_dir_empty": (["--output_dir="], ["--output_dir is empty"]),
    "output_dir_is_a_file": (["--output_dir={tmp}/a_file"],
                             ["--output_dir={tmp}/a_file is a file, not a folder"]),
    "output_dir_under_a_file": (["--output_dir={tmp}/a_file/out"],
                                ["--output_dir={tmp}/a_file/out is under {tmp}/a_file, which "
                                 "is a file"]),
    "output_dir_read_only": (["--output_dir={ro}/train_main_test/out"],
                             ["--output_dir={ro}/train_main_test/out: cannot write in {ro} ("]),
    "output_dir_not_utf8": (["--output_dir={fresh}/out\udcff"],
                            ["--output_dir=b'{fresh}/out\\xff' is not UTF-8"]),
    "export_dir_under_a_file": (["--export_dir={tmp}/a_file/exports"],
                                ["--export_dir={tmp}/a_file/exports is under {tmp}/a_file"]),
    "export_dir_read_only": (["--export_dir={ro}/train_main_test/exports"],
                             ["--export_dir={ro}/train_main_test/exports: cannot write in {ro}"]),
    "wav_entry_is_a_directory": (["--dataset=wav:{tmp}/wav_dir_entry"],
                                 ["WAV file {tmp}/wav_dir_entry/b.wav is a directory"]),
    "wav_entry_is_a_broken_link": (["--dataset=wav:{tmp}/wav_broken_link"],
                                   ["WAV file {tmp}/wav_broken_link/b.wav is a broken symbolic "
                                    "link"]),
    "wav_entry_is_a_fifo": (["--dataset=wav:{tmp}/wav_fifo"],   # used to hang
                            ["WAV file {tmp}/wav_fifo/b.wav is a FIFO"]),
    "wav_random_bytes": (["--dataset=wav:{tmp}/wav_noise"],
                         ["cannot decode {tmp}/wav_noise/b.wav: not a WAV file"]),
    # text: takes a folder or a glob of files; one without files is refused
    "text_directory_without_files": (["--dataset=text:{tmp}/empty_tfds"],
                                     ["text directory {tmp}/empty_tfds holds no regular files"]),
    "text_glob_matches_nothing": (["--dataset=text:{tmp}/no_such_*.txt"],
                                  ["no regular files match the text glob {tmp}/no_such_*.txt"]),
    # fails after the output folder is made (the pattern is built after it)
    "fails_after_making_output_dir": (["--output_dir={fresh}/a/out", "--summary=32"],
                                      ["summary * head_groups (32 * 1) must be <= stride (16)"]),
}

BAD_INPUTS_WRAPPER = '''\
"""Runs train_main once per case, each in a child forked from this process after it has
imported train_main (TensorFlow's import is most of the time of a run that fails early).

argv: REPO_ROOT CASES_JSON --output_dir=DIR (from Jobs). CASES_JSON holds {case: args};
case's stdout and stderr go to DIR/<case>.stdout and .stderr, the exit statuses to
DIR/status.json (None: killed after 60 s, e.g. blocked)."""
import json, os, signal, sys, time, traceback
sys.path.insert(0, sys.argv[1])
from absl import app
import train_main

def run_case(args, base):
  for fd, suffix in ((1, "stdout"), (2, "stderr")):
    f = os.open(f"{base}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
  try:
    app.run(train_main.main, argv=["train_main.py"] + args)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

with open(sys.argv[2]) as f:
  cases = json.load(f)
out = sys.argv[3].split("=", 1)[1]
os.makedirs(out, exist_ok=True)
status = {}
for case, args in cases.items():
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    run_case(args, os.path.join(out, case))
  deadline = time.monotonic() + 60
  while True:
    done, wait_status = os.waitpid(pid, os.WNOHANG)
    if done:
      status[case] = os.waitstatus_to_exitcode(wait_status)
      break
    if time.monotonic() > deadline:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      status[case] = None
      break
    time.sleep(0.02)
with open(os.path.join(out, "status.json"), "w") as f:
  json.dump(status, f)
'''


# ---------------------------------------------------------------------------
# Processes


class Proc:
  """A started script process; stdout and stderr go to files (no pipe deadlocks)."""

  def __init__(self, args, log_dir, name, env_extra=None, script=None):
    os.makedirs(log_dir, exist_ok=True)
    self.args = list(args)
    self.out_path = os.path.join(log_dir, f"{name}.stdout")
    self.err_path = os.path.join(log_dir, f"{name}.stderr")
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = REPO_ROOT
    env["CUDA_VISIBLE_DEVICES"] = ""   # CPU only: mirrored uses --cpu_replicas
    env.update(env_extra or {})
    cmd = [sys.executable] + ([script, REPO_ROOT] if script else [SCRIPT]) + self.args
    with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
      self.popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)

  def kill(self):
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()

  def read(self):
    """(stdout, stderr) so far."""
    with open(self.out_path, errors="replace") as f:
      out = f.read()
    with open(self.err_path, errors="replace") as f:
      err = f.read()
    return out, err


def describe(args, rc, out, err):
  status = f"timed out after {TIMEOUT} s" if rc is None else f"exit {rc}"
  return f"{status}: {args}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"


def run_together(procs, timeout=TIMEOUT):
  """Waits for processes that run together; returns [(returncode, stdout, stderr)].

  As soon as one fails, the others are killed (a worker of a failed
  multi-worker run would otherwise wait for its peer until the timeout); all
  are stopped on the way out, whatever happens. returncode is None for a
  process still running at the timeout.
  """
  deadline = time.monotonic() + timeout
  timed_out = set()
  try:
    while True:
      codes = [p.popen.poll() for p in procs]
      if None not in codes or any(c not in (None, 0) for c in codes):
        break
      if time.monotonic() > deadline:
        timed_out = {i for i, c in enumerate(codes) if c is None}
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      p.kill()
  return [(None if i in timed_out else p.popen.returncode,) + p.read()
          for i, p in enumerate(procs)]


class Jobs:
  """Runs the script in the background, one job at a time in each of two lanes.

  A run keeps about one core busy (start-up, tracing and sampling are mostly
  single-threaded Python), so two lanes suit the 2-core machine: two at a
  time took 2/3 of the wall time of one at a time, for the same CPU time.

  A job is one run, or a group of runs started together (the multi-worker
  pair); `result(name)` waits for a run and returns (returncode, stdout,
  stderr), returncode None after a timeout. A run's --output_dir is
  `dir(name)` unless its args give one.
  """

  def __init__(self, base, lanes=("a", "b")):
    self.base = base
    self.queues = {lane: [] for lane in lanes}
    self.results = {}
    self.args = {}
    self.running = []
    self.stopped = False
    self.cond = threading.Condition()
    self.threads = [threading.Thread(target=self._work, args=(lane,), daemon=True)
                    for lane in lanes]
    for t in self.threads:
      t.start()

  def dir(self, name):
    return os.path.join(self.base, name)

  def submit(self, name, args, env=None, script=None, lane="a", first=False):
    """Queues one run."""
    self.submit_group([name], lambda: [(args, env, script)], lane, first)

  def submit_group(self, names, make, lane="a", first=False):
    """Queues runs started together; `make()` gives their [(args, env, script)] at start."""
    with self.cond:
      for name in names:
        self.args[name] = None
      job = (names, make)
      queue = self.queues[lane]
      queue.insert(0, job) if first else queue.append(job)
      self.cond.notify_all()

  def _work(self, lane):
    queue = self.queues[lane]
    while True:
      with self.cond:
        self.cond.wait_for(lambda: queue or self.stopped)
        if self.stopped:
          return
        names, make = queue.pop(0)
      procs, results = [], None
      try:
        for name, (args, env, script) in zip(names, make()):
          if not any(a.startswith("--output_dir=") for a in args):
            args = list(args) + [f"--output_dir={self.dir(name)}"]
          with self.cond:
            self.args[name] = args
          procs.append(Proc(args, os.path.join(self.base, "logs"), name, env, script))
          with self.cond:
            self.running.append(procs[-1])
        results = run_together(procs)
      except Exception as e:  # noqa: BLE001 - reported by result()
        results = [(-1, "", f"could not run: {e!r}")] * len(names)
      finally:
        for p in procs:
          p.kill()
        with self.cond:
          for p in procs:
            self.running.remove(p)
          for name, result in zip(names, results or []):
            self.results[name] = result
          self.cond.notify_all()

  def result(self, name):
    with self.cond:
      assert name in self.args, f"{name} was never submitted"
      if not self.cond.wait_for(lambda: name in self.results, timeout=6 * TIMEOUT):
        pytest.fail(f"{name} did not finish")
      return self.results[name]

  def ok(self, name):
    """Asserts the run exited 0; returns its stdout."""
    rc, out, err = self.result(name)
    assert rc == 0, describe(self.args[name], rc, out, err)
    return out

  def stop(self):
    with self.cond:
      self.stopped = True
      for queue in self.queues.values():
        queue.clear()
      self.cond.notify_all()
      running = list(self.running)
    for p in running:
      p.kill()
    for t in self.threads:
      t.join(timeout=30)


# ---------------------------------------------------------------------------
# Test data


def write_text(path):
  """~50 KB of English-like sentences: repetitive enough to learn in 30 steps."""
  subjects = ["The cat", "A dog", "My neighbour", "The old sailor", "Every student",
              "The small robot", "Our teacher", "A tired bird"]
  verbs = ["eats", "watches", "paints", "finds", "carries", "likes", "builds", "reads"]
  objects = ["a red apple", "the blue door", "seven green boxes", "an old map",
             "the morning paper", "a wooden chair", "two yellow kites", "the quiet river"]
  rng = np.random.default_rng(0)
  parts, size = [], 0
  while size < 50_000:
    s = (f"{subjects[rng.integers(8)]} {verbs[rng.integers(8)]} "
         f"{objects[rng.integers(8)]}.\n")
    parts.append(s)
    size += len(s)
  with open(path, "w") as f:
    f.write("".join(parts))


def write_wavs(directory, rate):
  """Two 1-second 16-bit WAV files of harmonic tones at `rate` Hz."""
  import tensorflow as tf
  os.makedirs(directory, exist_ok=True)
  t = np.arange(rate) / rate
  for i, freq in enumerate((220.0, 330.0)):
    wave = 0.5 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * 2 * freq * t)
    data = tf.audio.encode_wav(wave.astype(np.float32)[:, None], rate)
    tf.io.write_file(os.path.join(directory, f"tone{i}.wav"), data)


def free_ports(count):
  """Ports free right now (bound to port 0, then closed)."""
  socks, ports = [], []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
      ports.append(s.getsockname()[1])
  finally:
    for s in socks:
      s.close()
  return ports


# ---------------------------------------------------------------------------
# The background runs, started with the first test


def multi_worker_pair(out_dir):
  """The two workers' [(args, env, script)], on ports chosen free when they start: global
  batch 4, 2 examples on each worker."""
  cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
  args = FEW_STEPS + ["--strategy=multi_worker", f"--output_dir={out_dir}"]
  return [(args, {"TF_CONFIG": json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": i}})}, None)
          for i in range(2)]


def bad_input_paths(jobs, case):
  """The values of BAD_INPUTS' "{tmp}", "{fresh}" and "{ro}" for `case`."""
  ro = "/sys" if os.geteuid() == 0 else os.path.join(jobs.data, "read_only")
  return {"tmp": jobs.data, "fresh": os.path.join(jobs.base, "fresh", case), "ro": ro}


def write_bad_inputs(jobs, data):
  """The files BAD_INPUTS reads, the arguments of BAD_FLAGS' (as bad_<case>, --output_dir
  `jobs.dir(bad_<case>)`) and BAD_INPUTS' cases in bad_inputs.json, and the script that
  runs them all (`BAD_INPUTS_WRAPPER`)."""
  with open(os.path.join(data, "a_file"), "w") as f:
    f.write("a file where a folder is expected\n")
  def write_noise(path):
    with open(path, "wb") as f:
      f.write(bytes(range(255, 0, -1)))   # TF's decode error quotes the first bytes: not UTF-8

  good = os.path.join(data, "wav8k", "tone0.wav")
  for folder, make_b in [("wav_dir_entry", os.mkdir),
                         ("wav_broken_link", lambda p: os.symlink(p + ".gone", p)),
                         ("wav_fifo", os.mkfifo), ("wav_noise", write_noise)]:
    os.makedirs(os.path.join(data, folder))
    shutil.copy(good, os.path.join(data, folder, "a.wav"))   # a good file first
    make_b(os.path.join(data, folder, "b.wav"))
  if os.geteuid() != 0:
    os.makedirs(os.path.join(data, "read_only"), mode=0o555)
  os.makedirs(os.path.join(jobs.base, "fresh"))
  cases = {f"bad_{case}": TINY + ["--steps=1", "--steps_per_epoch=1",
                                  f"--output_dir={jobs.dir(f'bad_{case}')}"] +
           [a.format(tmp=data) for a in extra] for case, (extra, _) in BAD_FLAGS.items()}
  for case, (extra, _) in BAD_INPUTS.items():
    paths = bad_input_paths(jobs, case)
    args = TINY + ["--steps=1", "--steps_per_epoch=1"] + [a.format(**paths) for a in extra]
    if not any(a.startswith("--output_dir=") for a in args):
      args.append(f"--output_dir={paths['fresh']}/out")
    cases[case] = args
  with open(os.path.join(data, "bad_inputs.json"), "w") as f:
    json.dump(cases, f)
  with open(os.path.join(data, "run_bad_inputs.py"), "w") as f:
    f.write(BAD_INPUTS_WRAPPER)


def resume_copies(jobs):
  """Once run A (`resume_a`) has finished, and before B continues it in A's folder: copies
  of A's folder for C and for the run with other model flags, and A's own metrics, and
  the files of the other-flags copy's backup. Made once, by whichever of those three
  runs starts first (their jobs call this when they start); A's failure is theirs."""
  with jobs.copy_lock:
    if jobs.resume_a_state is None:
      rc, out, err = jobs.result("resume_a")
      if rc != 0:
        raise RuntimeError("resume_a failed: " + describe(jobs.args["resume_a"], rc, out, err))
      dir_a = jobs.dir("resume_a")
      with open(os.path.join(dir_a, "backup", "training_metadata.json")) as f:
        state = {"metrics": metrics(dir_a), "metadata": json.load(f)}
      for name in ("resume_c", "resume_other_flags"):
        shutil.copytree(dir_a, jobs.dir(name))
      state["other_flags_backup"] = file_contents(os.path.join(jobs.dir("resume_other_flags"),
                                                               "backup"))
      jobs.resume_a_state = state
    return jobs.resume_a_state


def after_resume_a(jobs, args):
  """A job's `make` for a run that starts from A's checkpoint (`resume_copies`)."""
  def make():
    resume_copies(jobs)
    return [(args, None, None)]
  return make


def submit_background_jobs(jobs, data, selected):
  """Queues the runs of the selected tests, each lane in the order listed: the resume chain
  first (B, C and the other-flags run start from A's checkpoint: their lanes reach them
  after A has finished), the longest runs early, so that both lanes end together."""
  cifar = TINY + ["--dataset=tfds:cifar10", "--seq_len=3072", "--steps=2", "--steps_per_epoch=1",
                  "--num_layers=1", "--d_model=16", "--batch_size=2", "--block_size=64",
                  "--stride=128", "--summary=32", f"--data_dir={data}/no_tfds_data"]
  wav8k = ("wav8k", TINY + LEARN + [f"--dataset=wav:{data}/wav8k", "--resume"])
  resume_a = ("resume_a", RESUME + ["--stop_after_epochs=1"])
  resume_b = ("resume_b", RESUME + ["--resume", f"--output_dir={jobs.dir('resume_a')}"], None,
              True)
  resume_c = ("resume_c", RESUME, None, True)
  other_flags = ("resume_other_flags", RESUME + ["--resume", "--strategy=mirrored"] + OTHER_MODEL,
                 None, True)
  few_steps_default = ("few_steps_default", FEW_STEPS + ["--strategy=default"])
  bad = ("bad_inputs", [f"{data}/bad_inputs.json"], f"{data}/run_bad_inputs.py")
  runs = {  # test: [(run name, args[, script[, after resume_a]])]
      "test_pydoc": [("pydoc", TINY + LEARN + ["--dataset=pydoc"])],
      "test_text_file": [("text", TINY + LEARN + [f"--dataset=text:{data}/corpus.txt"])],
      "test_digits_image": [("digits", TINY + LEARN + ["--dataset=digits", "--seq_len=64",
                                                       "--pattern=strided", "--stride=8"])],
      "test_tfds_cifar10_mocked": [("cifar10", cifar, f"{data}/run_mocked_tfds.py")],
      # one run of 8 kHz recordings: learns, keeps their rate, and (--resume in a new
      # folder) starts fresh
      "test_wav_dir": [wav8k],
      "test_wav_sample_keeps_sample_rate": [wav8k],
      "test_resume_without_checkpoint_starts_fresh": [wav8k],
      "test_mirrored_matches_default": [
          few_steps_default,
          ("few_steps_mirrored", FEW_STEPS + ["--strategy=mirrored", "--cpu_replicas=2"])],
      "test_resume": [resume_a, resume_b, resume_c],
      "test_resume_with_other_model_flags": [resume_a, other_flags],
      "test_multi_worker": [few_steps_default],   # the reference; the workers: below
      "test_bad_flags": [bad],   # one process runs both tests' cases
      "test_bad_inputs": [bad],
  }
  lanes = {"a": ["resume_a", "resume_b", "cifar10", "resume_other_flags", "digits",
                 "worker0", "bad_inputs"],
           "b": ["pydoc", "resume_c", "text", "wav8k", "few_steps_mirrored",
                 "few_steps_default"]}
  if {"test_bad_flags", "test_bad_inputs"} & selected:
    write_bad_inputs(jobs, data)
  chosen = {run[0]: run for test, test_runs in runs.items() if test in selected
            for run in test_runs}
  assert set(chosen) <= {n for names in lanes.values() for n in names}, sorted(chosen)
  for lane, names in lanes.items():
    for name in names:
      if name == "worker0" and "test_multi_worker" in selected:
        jobs.submit_group(["worker0", "worker1"],
                          lambda: multi_worker_pair(jobs.dir("multi_worker")), lane=lane)
      elif name in chosen:
        _, args, script, after_a = (chosen[name] + (None, False))[:4]
        if after_a:
          jobs.submit_group([name], after_resume_a(jobs, args), lane=lane)
        else:
          jobs.submit(name, args, script=script, lane=lane)


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
  """The background runs of the selected tests, all queued at once."""
  data = str(tmp_path_factory.mktemp("train_main_data"))
  write_text(os.path.join(data, "corpus.txt"))
  write_wavs(os.path.join(data, "wav8k"), 8000)
  with open(os.path.join(data, "run_mocked_tfds.py"), "w") as f:
    f.write(TFDS_WRAPPER)
  os.makedirs(os.path.join(data, "empty_tfds"))
  os.makedirs(os.path.join(data, "exports", "1"))   # an export of version 1 exists
  selected = {item.originalname for item in request.session.items
              if item.module is request.module}
  runner = Jobs(str(tmp_path_factory.mktemp("train_main_runs")))
  runner.data = data
  runner.copy_lock, runner.resume_a_state = threading.Lock(), None   # see resume_copies
  try:
    submit_background_jobs(runner, data, selected)
    yield runner
  finally:
    runner.stop()   # kills whatever still runs


@pytest.fixture(scope="module", autouse=True)
def _start_jobs(jobs):
  """Queues every background run before the first test of the module runs."""


# ---------------------------------------------------------------------------
# Checks


def metrics(out_dir):
  with open(os.path.join(out_dir, "metrics.json")) as f:
    return json.load(f)


def scalars(log_dir):
  """{tag: {step: value}} of the TensorBoard scalars in the event files of `log_dir`
  (e.g. logs/train); asserts that no tag has two values at one step."""
  import tensorflow as tf
  found = {}
  for name in sorted(os.listdir(log_dir)):
    for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          steps = found.setdefault(value.tag, {})
          assert event.step not in steps, f"{value.tag} twice at step {event.step} in {log_dir}"
          steps[event.step] = float(tf.make_ndarray(value.tensor))
  return found


def check_step_scalars(out_dir, unit, steps, steps_per_epoch, every=5):
  """The per-step TensorBoard points of a run of `steps` steps: loss, the unit and the
  learning rate every `every` steps, at the global step; each is the mean of the
  steps since the previous point, so those of an epoch average to its epoch_ value."""
  train = scalars(os.path.join(out_dir, "logs", "train"))
  points = list(range(every, steps + 1, every))
  for name in ("loss", unit, "learning_rate"):
    assert sorted(train.get(f"batch_{name}", {})) == points, (name, sorted(train))
  units = {"bits_per_byte", "bits_per_dim", "bits_per_sample"}
  assert not [tag for tag in train if any(u in tag for u in units - {unit})], sorted(train)
  for step in points:
    assert train[f"batch_{unit}"][step] == pytest.approx(
        train["batch_loss"][step] / math.log(2), rel=1e-4)
  per_epoch = steps_per_epoch // every
  for epoch, value in train["epoch_loss"].items():
    window = points[epoch * per_epoch:(epoch + 1) * per_epoch]
    assert value == pytest.approx(np.mean([train["batch_loss"][s] for s in window]),
                                  rel=1e-5), (epoch, train)
  return train


def check_outputs(out_dir, sample_name):
  """The files every finished run writes; returns metrics.json."""
  assert os.path.isfile(os.path.join(out_dir, "model.keras"))
  assert os.path.getsize(os.path.join(out_dir, "model.keras")) > 0
  with open(os.path.join(out_dir, "backup", "training_metadata.json")) as f:
    assert "epoch" in json.load(f)
  with open(os.path.join(out_dir, "backup", "run_config.json")) as f:
    run_config = json.load(f)
  for name in ("dataset", "num_layers", "d_model", "steps_per_epoch"):
    assert run_config["checkpoint_flags"][name] == run_config["flags"][name], (name, run_config)
  logs = os.path.join(out_dir, "logs")
  events = [os.path.join(d, n) for d, _, names in os.walk(logs) for n in names]
  assert events and any(os.path.getsize(e) > 0 for e in events), f"no TensorBoard logs: {logs}"
  samples = {"sample.txt", "sample.png", "sample.wav"} & set(os.listdir(out_dir))
  assert samples == {sample_name}, f"samples written: {samples}"
  assert os.path.getsize(os.path.join(out_dir, sample_name)) > 0
  m = metrics(out_dir)
  for key in ("history", "validation", "steps_done"):
    assert key in m, f"metrics.json lacks {key}: {sorted(m)}"
  return m


def check_learns(m, steps, epochs):
  loss = m["history"]["loss"]
  assert len(loss) == epochs, loss
  assert all(math.isfinite(x) for x in loss), loss
  assert loss[0] > loss[-1], f"training loss did not decrease: {loss}"
  assert m["steps_done"] == steps
  assert all(math.isfinite(v) for v in m["validation"].values()), m["validation"]


# ---------------------------------------------------------------------------
# 1. Every offline dataset trains and writes its outputs


def test_pydoc(jobs):
  jobs.ok("pydoc")
  out = jobs.dir("pydoc")
  m = check_outputs(out, "sample.txt")
  check_learns(m, steps=30, epochs=3)
  assert m["dataset"] == "pydoc" and m["seq_len"] == 64
  assert set(m["validation"]) == {"loss", "bits_per_byte"}
  check_step_scalars(out, "bits_per_byte", steps=30, steps_per_epoch=10)
  with open(os.path.join(out, "sample.txt"), "rb") as f:
    sample = f.read()
  assert len(sample) == 32 + 16, sample   # the 32-token prompt + --sample_tokens


def test_text_file(jobs):
  jobs.ok("text")
  out = jobs.dir("text")
  m = check_outputs(out, "sample.txt")
  check_learns(m, steps=30, epochs=3)
  assert m["seq_len"] == 64
  with open(os.path.join(jobs.data, "corpus.txt"), "rb") as f:
    corpus = f.read()
  with open(os.path.join(out, "sample.txt"), "rb") as f:
    sample = f.read()
  assert len(sample) == 32 + 16
  # The prompt is the start of the validation part (bytes 90%..95% of the file).
  assert sample[:32] == corpus[len(corpus) * 90 // 100:][:32]


def test_digits_image(jobs):
  import tensorflow as tf
  jobs.ok("digits")
  out = jobs.dir("digits")
  m = check_outputs(out, "sample.png")
  check_learns(m, steps=30, epochs=3)
  assert set(m["validation"]) == {"loss", "bits_per_dim"}
  check_step_scalars(out, "bits_per_dim", steps=30, steps_per_epoch=10)
  with open(os.path.join(out, "sample.png"), "rb") as f:
    png = f.read()
  assert png[:8] == PNG_SIGNATURE
  image = tf.io.decode_png(png).numpy()
  assert image.shape == (128, 128, 1), image.shape   # 8x8 enlarged 16 times
  assert image.dtype == np.uint8


def test_tfds_cifar10_mocked(jobs):
  import tensorflow as tf
  jobs.ok("cifar10")
  out = jobs.dir("cifar10")
  m = check_outputs(out, "sample.png")
  assert m["dataset"] == "tfds:cifar10"
  assert m["seq_len"] == 3072 and m["steps_done"] == 2
  loss = m["history"]["loss"]
  assert len(loss) == 2 and all(math.isfinite(x) for x in loss), loss
  assert all(math.isfinite(v) for v in m["validation"].values()), m["validation"]
  with open(os.path.join(out, "sample.png"), "rb") as f:
    png = f.read()
  assert png[:8] == PNG_SIGNATURE
  assert tf.io.decode_png(png).shape == (128, 128, 3)   # 32x32x3 enlarged 4 times


def test_wav_dir(jobs):
  """The folder of 8 kHz WAV files (the run the next two tests read too)."""
  import tensorflow as tf
  jobs.ok("wav8k")
  out = jobs.dir("wav8k")
  m = check_outputs(out, "sample.wav")
  check_learns(m, steps=30, epochs=3)
  assert set(m["validation"]) == {"loss", "bits_per_sample"}   # 8-bit µ-law samples
  check_step_scalars(out, "bits_per_sample", steps=30, steps_per_epoch=10)
  audio, rate = tf.audio.decode_wav(tf.io.read_file(os.path.join(out, "sample.wav")))
  assert int(rate) == 8000   # the recordings' rate (16000 is the writer's fallback)
  assert audio.shape == (48, 1), audio.shape   # 32-sample prompt + 16 generated
  assert np.all(np.abs(audio.numpy()) <= 1.0)


def test_wav_sample_keeps_sample_rate(jobs):
  """The sample of 8 kHz recordings is an 8 kHz WAV (else it plays twice as fast); not
  16000 Hz, the rate written when the data gives none."""
  import tensorflow as tf
  jobs.ok("wav8k")
  path = os.path.join(jobs.dir("wav8k"), "sample.wav")
  _, rate = tf.audio.decode_wav(tf.io.read_file(path))
  assert int(rate) == 8000, f"sample.wav of 8000 Hz recordings is written at {int(rate)} Hz"


# ---------------------------------------------------------------------------
# 2. mirrored == default at the same global batch


def test_mirrored_matches_default(jobs):
  jobs.ok("few_steps_default")
  out = jobs.ok("few_steps_mirrored")
  assert "strategy mirrored (2 replicas)" in out, out
  runs = {s: metrics(jobs.dir(f"few_steps_{s}")) for s in ("default", "mirrored")}
  loss = {s: m["history"]["loss"] for s, m in runs.items()}
  assert len(loss["default"]) == 2 and all(math.isfinite(x) for x in loss["default"]), loss
  assert loss["mirrored"] == pytest.approx(loss["default"], rel=1e-4), loss
  for k, v in runs["default"]["validation"].items():
    assert runs["mirrored"]["validation"][k] == pytest.approx(v, rel=1e-4), (k, runs)
  assert all(m["steps_done"] == 4 for m in runs.values())


# ---------------------------------------------------------------------------
# 3. multi_worker: two local workers


def worker_summary(out):
  """(steps, final training loss, weight checksum) from a worker's last line."""
  line = [l for l in out.splitlines() if l.startswith("worker ")][-1]
  words = line.replace(",", "").split()
  return int(words[3]), float(words[8]), float(words[11])


def test_multi_worker(jobs):
  """Two workers on 127.0.0.1, started together by `Jobs` (which always stops both:
  a failed worker gets its peer killed, and both are killed after TIMEOUT)."""
  import tensorflow as tf
  results = {w: jobs.result(w) for w in ("worker0", "worker1")}
  # Report a worker that failed by itself before one killed because its peer failed.
  for w in sorted(results, key=lambda w: results[w][0] in (0, -9, None)):
    assert results[w][0] == 0, f"{w}: " + describe(jobs.args[w], *results[w])
  for w, (_, out, _) in results.items():
    assert "strategy multi_worker (2 replicas)" in out, (w, out)
  out = jobs.dir("multi_worker")
  # The chief's outputs, and one checkpoint, at the last step.
  m = check_outputs(out, "sample.txt")
  assert m["steps_done"] == 4
  loss = m["history"]["loss"]
  assert len(loss) == 2 and all(math.isfinite(x) for x in loss), loss
  assert all(math.isfinite(v) for v in m["validation"].values()), m["validation"]
  backup = os.path.join(out, "backup")
  with open(os.path.join(backup, "training_metadata.json")) as f:
    assert json.load(f) == {"epoch": 2, "step": 4}
  # The newest two checkpoints (a damaged newest one falls back to the other).
  assert sorted(n for n in os.listdir(backup) if n.endswith(".index")) == ["ckpt-2.index",
                                                                            "ckpt-4.index"]
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(backup))
  assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 4
  assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 4
  # Worker 1 kept nothing (its checkpoints went to a temporary folder it deleted).
  assert not [n for n in os.listdir(out) if n.startswith("worker")], os.listdir(out)
  # Synchronous replicas: both workers ran 4 steps and end with the same weights.
  summary = {w: worker_summary(results[w][1]) for w in results}
  assert summary["worker0"][0] == summary["worker1"][0] == 4, summary
  assert summary["worker0"][1] == pytest.approx(loss[-1], rel=1e-6), (summary, loss)
  assert summary["worker1"][1] == summary["worker0"][1], summary
  assert summary["worker1"][2] == pytest.approx(summary["worker0"][2], rel=1e-9), summary
  # It really trained on the global batch: the losses of `default` at the same global
  # batch (2 examples on each worker = the 4 of one default step).
  jobs.ok("few_steps_default")
  ref = metrics(jobs.dir("few_steps_default"))
  assert loss == pytest.approx(ref["history"]["loss"], rel=1e-4), (loss, ref["history"])
  assert loss[-1] < loss[0], loss
  for k, v in ref["validation"].items():
    assert m["validation"][k] == pytest.approx(v, rel=1e-4), (k, m["validation"], ref)
  # The custom loop's TensorBoard points are fit's: same names, steps and values.
  points = check_step_scalars(out, "bits_per_byte", steps=4, steps_per_epoch=2, every=2)
  ref_points = check_step_scalars(jobs.dir("few_steps_default"), "bits_per_byte", steps=4,
                                  steps_per_epoch=2, every=2)
  for tag in ("batch_loss", "batch_bits_per_byte", "batch_learning_rate", "epoch_loss"):
    assert points[tag] == pytest.approx(ref_points[tag], rel=1e-4), (tag, points, ref_points)


# ---------------------------------------------------------------------------
# 4. --resume continues an interrupted run exactly


def test_resume(jobs):
  """A: interrupted after its first epoch (and checkpoint). Then, from a copy each
  of A's folder: B continues it with --resume; C runs without --resume, so it
  must start over, and is then the uninterrupted run that B must match. (B and C
  are queued with A and start after it: `resume_copies` copies A's folder for C and
  reads A's outputs before B changes them.)"""
  jobs.ok("resume_a")
  out_b = jobs.ok("resume_b")
  dir_a, dir_c = jobs.dir("resume_a"), jobs.dir("resume_c")
  a = jobs.resume_a_state["metrics"]
  assert a["steps_done"] == 10 and len(a["history"]["loss"]) == 1, a
  assert jobs.resume_a_state["metadata"]["epoch"] == 1
  jobs.ok("resume_c")
  assert "starting fresh" not in out_b, out_b
  b, c = metrics(dir_a), metrics(dir_c)
  # C started over: its own 20 steps, both epochs, the first one identical to A's.
  assert c["steps_done"] == 20, c
  assert len(c["history"]["loss"]) == 2, c
  assert c["history"]["loss"][0] == pytest.approx(a["history"]["loss"][0], rel=1e-5), (a, c)
  # B continued A: only the second epoch was run, and it ends where C ends.
  assert b["steps_done"] == 20, b
  assert len(b["history"]["loss"]) == 1, b
  assert b["history"]["loss"][0] == pytest.approx(c["history"]["loss"][1], rel=1e-5), (b, c)
  assert set(b["validation"]) == set(c["validation"])
  for k, v in c["validation"].items():
    assert b["validation"][k] == pytest.approx(v, rel=1e-5), (k, b["validation"], c["validation"])
  # TensorBoard: B's points continue A's at the global step (15, 20; each step once,
  # which `scalars` asserts), and are C's; C started over with new logs.
  points_ab = check_step_scalars(dir_a, "bits_per_byte", steps=20, steps_per_epoch=10)
  points_c = check_step_scalars(dir_c, "bits_per_byte", steps=20, steps_per_epoch=10)
  for step in (15, 20):
    assert points_ab["batch_loss"][step] == pytest.approx(points_c["batch_loss"][step],
                                                          rel=1e-5), (points_ab, points_c)


def file_contents(folder):
  """{name: bytes} of the files in `folder`."""
  contents = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      contents[name] = f.read()
  return contents


def check_usage_error(jobs, name, words):
  """The run stopped with exit 2 and one `train_main.py: error:` line holding `words`,
  no traceback, before training; returns the line."""
  return check_error_output(jobs.args[name], *jobs.result(name), words)


def check_error_output(args, rc, out, err, words):
  """`check_usage_error` of a run's `args`, returncode, stdout and stderr."""
  assert rc == 2, describe(args, rc, out, err)
  assert "Traceback" not in err and "Traceback" not in out, err
  lines = [l for l in err.splitlines() if l.startswith("train_main.py: error:")]
  assert len(lines) == 1, err
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert "training " not in out, out   # stopped before training started
  return lines[0]


def test_resume_with_other_model_flags(jobs):
  """--resume of A's checkpoint with other model flags stops with one line naming each
  (old -> new); the flags that may change on resume are not named, and the
  checkpoint is left as it was. (Run on a copy of A's folder: `resume_copies`.)"""
  jobs.ok("resume_a")
  backup = os.path.join(jobs.dir("resume_other_flags"), "backup")
  line = check_usage_error(jobs, "resume_other_flags",
                           ["--resume", backup,
                            "--num_layers 1 -> 2, --d_model 32 -> 64, --pattern fixed -> strided"])
  for allowed in ("--steps", "--dropout", "--block_size", "--learning_rate", "--strategy"):
    assert allowed + " " not in line, (allowed, line)
  assert file_contents(backup) == jobs.resume_a_state["other_flags_backup"], \
      "the checkpoint folder changed"


def test_resume_without_checkpoint_starts_fresh(jobs):
  """The wav8k run passes --resume into a new folder: it says so and trains (all its
  steps: test_wav_dir checks them)."""
  out = jobs.ok("wav8k")
  lines = [l for l in out.splitlines() if "starting fresh" in l]
  assert lines == [f"--resume: no checkpoint in {jobs.dir('wav8k')}/backup: starting fresh"], out
  assert metrics(jobs.dir("wav8k"))["steps_done"] == 30


# ---------------------------------------------------------------------------
# 5. Bad flags and paths: one clear line, exit 2, no traceback, no folder left behind


def bad_input_run(jobs, case):
  """(args, returncode, stdout, stderr) of a case run by `BAD_INPUTS_WRAPPER`."""
  jobs.ok("bad_inputs")
  results = jobs.dir("bad_inputs")
  with open(os.path.join(results, "status.json")) as f:
    rc = json.load(f)[case]
  with open(os.path.join(results, f"{case}.stdout"), errors="replace") as f:
    out = f.read()
  with open(os.path.join(results, f"{case}.stderr"), errors="backslashreplace") as f:
    err = f.read()
  with open(os.path.join(jobs.data, "bad_inputs.json")) as f:
    args = json.load(f)[case]
  return args, rc, out, err


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(jobs, case):
  check_error_output(*bad_input_run(jobs, f"bad_{case}"),
                     [w.format(tmp=jobs.data) for w in BAD_FLAGS[case][1]])
  assert not os.path.exists(os.path.join(jobs.dir(f"bad_{case}"), "metrics.json"))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs(jobs, case):
  """A bad path stops the run before training with exit 2 and one line naming it, and no
  traceback or hang, and leaves no folder behind (each case is run by `BAD_INPUTS_WRAPPER`)."""
  args, rc, out, err = bad_input_run(jobs, case)
  paths = bad_input_paths(jobs, case)
  line = check_error_output(args, rc, out, err, [w.format(**paths) for w in BAD_INPUTS[case][1]])
  assert err.splitlines() == [line], err   # the child's stderr: nothing but that line
  assert not os.path.lexists(paths["fresh"]), os.listdir(paths["fresh"])
  assert not os.path.lexists(os.path.join(paths["ro"], "train_main_test"))
