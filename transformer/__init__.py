"""A JAX/Flax Transformer: the paper's encoder-decoder and the decoder-only GPT."""

from transformer.config import ConfigError, ModelConfig, preset
from transformer.models import GPT, EncoderDecoder
from transformer.rundir import RunDir, load_run

__all__ = ["ConfigError", "EncoderDecoder", "GPT", "ModelConfig", "RunDir", "load_run", "preset"]
__version__ = "0.1.0"
