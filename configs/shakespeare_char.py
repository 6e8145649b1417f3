"""nanoGPT's Shakespeare-char GPU recipe: 6 layers, 6 heads, 384 wide, context 256.

    python train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char

On one modern GPU it reaches a validation loss around 1.5 in a few minutes (5000 steps of
64 x 256 characters); on a CPU it takes hours (use configs/default.py there).
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["gpt2_small"])
    config.model.update(
        vocab_size=0,
        num_decoder_layers=6,
        num_heads=6,
        d_model=384,
        d_ff=1536,
        max_len=256,
        dropout_rate=0.2,
        attention_dropout_rate=0.0,
        dtype="bfloat16",  # compute; parameters stay float32
    )
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "char"
    config.data.seq_len = 256
    config.train.num_steps = 5000
    config.train.batch_size = 64
    config.train.learning_rate = 1e-3
    config.train.min_learning_rate = 1e-4
    config.train.warmup_steps = 100
    config.train.b2 = 0.99
    config.train.weight_decay = 0.1
    config.train.log_every_steps = 50
    config.train.eval_every_steps = 250
    config.train.eval_batches = 200
    config.checkpoint.every_steps = 1000
    return config
