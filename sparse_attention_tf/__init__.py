"""sparse_attention_tf: Sparse Transformer attention for TensorFlow 2 / Keras 3.

Layers of the library, each building on the one before:
  patterns   which keys each query may attend to (NumPy, static)
  layout     block layouts -> lookup tables for the kernels
  ops        the C++ block-sparse ops and their gradients
  reference  the same computation in plain TF ops (and dense attention)
  attention  `sparse_attention`, the function users call
  layers     Keras layers: attention, residual block, position embeddings
  models     the SparseTransformer model
  generation sampling: one-pass prefill + a compiled decoding loop (`generate`,
             `Sampler`, `SparseCausalLM` for your own functional models)
  metrics    bits per byte / per dim
  export     SavedModel export for TF Serving  (imported on first use: `sat.export`)
  plotting   pattern figures, with matplotlib  (imported on first use: `sat.plotting`)
"""

import importlib

from sparse_attention_tf import generation, layers, metrics, models, ops, patterns
from sparse_attention_tf.attention import sparse_attention
from sparse_attention_tf.generation import Sampler, SparseCausalLM
from sparse_attention_tf.layers import SparseMultiHeadAttention, SparseTransformerBlock
from sparse_attention_tf.metrics import BitsPerToken
from sparse_attention_tf.models import SparseTransformer
from sparse_attention_tf.patterns import (BigBird, Custom, Dense, Fixed, Local, Longformer, Split,
                                          Strided)

__version__ = "0.1.0"

__all__ = ["sparse_attention", "patterns", "layers", "models", "generation", "metrics", "ops",
           "export", "Sampler", "SparseCausalLM",
           "plotting", "Dense", "Local", "Strided", "Fixed", "Longformer", "BigBird", "Custom",
           "Split", "SparseMultiHeadAttention", "SparseTransformerBlock", "SparseTransformer",
           "BitsPerToken"]

# Imported on first access, not with the package: importing `export` here would
# make `python -m sparse_attention_tf.export` warn that it ran a module already imported.
_LAZY_MODULES = ("export", "plotting")


def __getattr__(name):
  if name in _LAZY_MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_MODULES))
