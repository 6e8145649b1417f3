"""The default's data and budget with a modern (Llama-style) decoder, to compare the two.

    python train.py --config=configs/llama_shakespeare.py --workdir=runs/llama_shakespeare
    python benchmarks/modern_decoder.py     # both configs, same steps, one table

The same width, depth, heads and parameter budget as `configs/default.py` (a GPT-2-style
decoder), with the four pieces Llama changed: rotary positions instead of a learned table,
SwiGLU (three matrices of width 512, as many weights as GELU's two of 768), RMSNorm, and
grouped-query attention (6 query heads over 2 key/value heads: a third of the KV cache); no
biases. Character-level Shakespeare, 1700 steps of 16 x 128 characters on a CPU.
"""

from transformer.config import PRESETS
from transformer.run_config import base_config


def get_config():
    config = base_config()
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
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "char"
    config.data.seq_len = 128
    config.train.num_steps = 1700
    config.train.batch_size = 16
    config.train.learning_rate = 2e-3
    config.train.min_learning_rate = 2e-4
    config.train.warmup_steps = 100
    config.train.weight_decay = 0.1
    config.train.b2 = 0.99
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 500
    config.train.eval_batches = 40
    config.checkpoint.every_steps = 500
    return config
