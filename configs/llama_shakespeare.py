"""The default's data and budget with a modern (Llama-style) decoder, to compare the two.

    python train.py --config=configs/llama_shakespeare.py --workdir=runs/llama_shakespeare
    python benchmarks/modern_decoder.py     # both configs, same steps, one table

The same width, depth, heads and parameter budget as `configs/default.py` (a GPT-2-style
decoder), with the four pieces Llama changed: rotary positions instead of a learned table,
SwiGLU (three matrices of width 512, as many weights as GELU's two of 768), RMSNorm, and
grouped-query attention (6 query heads over 2 key/value heads: a third of the KV cache); no
biases. Character-level Shakespeare, 1700 steps of 16 x 128 characters on a CPU.
"""

from pathlib import Path

from transformer.model.config import PRESETS
from transformer.train.config import load_config_file


def get_config():
    # The same data, steps, batch and schedule as the default.
    config = load_config_file(Path(__file__).with_name("default.py"))
    config.model.update(PRESETS["smollm_135m"])  # rotary, SwiGLU, RMSNorm, GQA, tied, no biases
    config.model.update(
        vocab_size=0,  # from the tokenizer (about 65 characters), padded to 64
        num_decoder_layers=6,
        num_heads=6,
        num_kv_heads=2,
        d_model=192,
        d_ff=512,  # 2/3 of 4 x 192, rounded: the FFN has the GPT-2-style default's parameters
        max_len=128,
    )
    return config
