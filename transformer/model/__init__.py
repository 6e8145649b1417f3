"""The model layer: `ModelConfig`, the kernels (`ops`), the Flax layers and the two models.

Imports only `transformer.errors`; nothing here knows about data, training or files.

  config      ModelConfig, presets, the Hugging Face families' structure, "the same model?"
  ops         the numeric kernels: attention, projections, norms, GELU, rotary, the loss
  layers      projections, feed-forward, norms, masks
  attention   multi-head attention (self, cross, grouped-query, cached)
  blocks      residual blocks and stacks
  embeddings  token and position embeddings, the tied output projection
  models      GPT and EncoderDecoder
  scan        scanned <-> unrolled parameter trees
  sharding    the device mesh and the one rules table mapping the logical axes onto it
"""

from transformer.model.config import ModelConfig, preset
from transformer.model.models import GPT, EncoderDecoder

__all__ = ["EncoderDecoder", "GPT", "ModelConfig", "preset"]
