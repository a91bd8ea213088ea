"""Which TensorFlow an op library was built against, read from its bytes (no dlopen).

The op ABI is tied to the TensorFlow minor version: a library built against
another one may fail to load, or load and misbehave. custom_ops/cc/build_info.cc
compiles a string into the library,

    SPARSE_ATTENTION_TF_BUILD_INFO{tensorflow=2.21.0;graph_def_version=2474}

(the build's `tf.__version__`, "unknown" when the build did not know it, and
the TensorFlow headers' `TF_GRAPH_DEF_VERSION`), which `read` finds by scanning
the file. `ops.py` checks it before `tf.load_op_library`; `setup.py` checks the
library it packages against the declared `tensorflow` range. Standard library
only: setup.py loads this file without TensorFlow.
"""

from __future__ import annotations

import re
from typing import Optional

MARKER = b"SPARSE_ATTENTION_TF_BUILD_INFO{"
_MAX_LEN = 256  # the longest build info string read after the marker


def read(path) -> dict:
  """The build info of the library at `path` ({} if it has none: an older build).

  Returns e.g. {"tensorflow": "2.21.0", "graph_def_version": "2474"}.
  """
  with open(path, "rb") as f:
    data = f.read()
  start = data.find(MARKER)
  if start < 0:
    return {}
  start += len(MARKER)
  end = data.find(b"}", start, start + _MAX_LEN)
  if end < 0:
    return {}
  fields = data[start:end].decode("ascii", "replace").split(";")
  return dict(field.split("=", 1) for field in fields if "=" in field)


def minor_version(version: str) -> Optional[tuple]:
  """(major, minor) of a TensorFlow version string ("2.21.0", "2.22.0-rc1"), or None."""
  match = re.match(r"(\d+)\.(\d+)", version or "")
  return (int(match.group(1)), int(match.group(2))) if match else None


def built_with(info: dict) -> str:
  """The TensorFlow a build info names, for messages: "TensorFlow 2.21.0"."""
  version = info.get("tensorflow", "unknown")
  if minor_version(version) is None:
    return f"an unknown TensorFlow (GraphDef version {info.get('graph_def_version', '?')})"
  return f"TensorFlow {version}"


def mismatch(info: dict, tf_version: str, graph_def_version: int) -> Optional[str]:
  """Why a library with build info `info` cannot run under this TensorFlow, or None.

  The library runs under any TensorFlow of the minor version it was built with;
  when it does not know that version, under a TensorFlow whose headers have its
  GraphDef version (one per TensorFlow release). Without any build info there
  is nothing to check (None): loading it decides.
  """
  built, running = minor_version(info.get("tensorflow", "")), minor_version(tf_version)
  if built is not None and running is not None:
    same = built == running
  elif info.get("graph_def_version", "").isdigit():
    same = int(info["graph_def_version"]) == graph_def_version
  else:
    return None
  if same:
    return None
  return (f"built with {built_with(info)}, running TensorFlow {tf_version} (the op ABI changes "
          "between TensorFlow minor versions)")
