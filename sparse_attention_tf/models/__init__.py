"""Models built from the Sparse Transformer layers."""

from sparse_attention_tf.models.sparse_transformer import (HEAD_MODES, SparseTransformer,
                                                           layer_patterns)

__all__ = ["SparseTransformer", "layer_patterns", "HEAD_MODES"]
