"""The numeric kernels the layers call: pure functions of arrays, with no parameters and no
config. Shapes use the legend at the top of `transformer/layers.py`.

Each kernel with a hand-written backward pass has a `*_reference` twin with the same signature
and forward formula, differentiated by JAX; `tests/test_custom_gradients.py` checks both against
autodiff of the formula written out there. The layers call kernels only through this package's
names, so choosing between a kernel and its reference (per platform, say) stays a change here.

  self_attention   softmax(Q K^T / sqrt(d_k)) V from fused projections [b, t, 3, n, h]
  matmul           x [..., *in] . W [*in, *out]
  layer_norm       (x - mean) / sqrt(var + eps) * scale + bias over the last axis
  rms_norm         x / sqrt(mean(x^2) + eps) * scale over the last axis
  gelu             GELU, tanh approximation
  dot_product_attention   the plain formula over separate q, k, v; returns the weights too,
                          or calls `jax.nn.dot_product_attention` (XLA, cuDNN)
  chunked_cross_entropy   output projection + cross-entropy a chunk of positions at a time
  apply_rotary     rotary position embedding of queries or keys (RoFormer, Llama)
"""

from transformer.ops.activations import gelu, gelu_reference
from transformer.ops.attention import (
    dot_product_attention,
    query_blocks,
    self_attention,
    self_attention_reference,
)
from transformer.ops.dense import matmul, matmul_reference
from transformer.ops.loss import chunked_cross_entropy
from transformer.ops.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from transformer.ops.rotary import apply_rotary, rotary_frequencies

__all__ = [
    "apply_rotary",
    "chunked_cross_entropy",
    "dot_product_attention",
    "gelu",
    "gelu_reference",
    "layer_norm",
    "layer_norm_reference",
    "matmul",
    "matmul_reference",
    "query_blocks",
    "rms_norm",
    "rms_norm_reference",
    "rotary_frequencies",
    "self_attention",
    "self_attention_reference",
]
