"""Keras 3 layers of the Sparse Transformer."""

from sparse_attention_tf.layers.attention import SparseMultiHeadAttention
from sparse_attention_tf.layers.block import SparseTransformerBlock, stateless_dropout
from sparse_attention_tf.layers.embeddings import (ImagePositionEmbedding, PositionEmbedding,
                                                   StridedPositionEmbedding)

__all__ = ["SparseMultiHeadAttention", "SparseTransformerBlock", "PositionEmbedding",
           "ImagePositionEmbedding", "StridedPositionEmbedding", "stateless_dropout"]
