"""Default: a small character-level GPT on Shakespeare that trains on a laptop CPU.

    python train.py            # = --config=configs/default.py --workdir=runs/default

Reaches a validation loss of 1.66 nats per character on the held-out plays after 1700 steps
of 16 x 128 characters (4 min 10-25 s in all on two otherwise idle CPU cores, about 15,000
tokens/s), then prints a sample with speaker names and line breaks.
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["gpt2_small"])  # GPT-2 architecture: pre-norm, GELU, learned pos.
    config.model.update(
        vocab_size=0,  # from the tokenizer (about 65 characters), padded to 64
        num_decoder_layers=6,
        num_heads=6,
        d_model=192,
        d_ff=768,
        max_len=128,
        dropout_rate=0.0,  # too short a run to overfit
        attention_dropout_rate=0.0,
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
