"""Tiny: the smallest real run, for tests and smoke checks (seconds on a CPU).

python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["tiny_gpt"])
    config.model.update(vocab_size=0, max_len=32)  # vocabulary from the tokenizer
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "char"
    config.data.seq_len = 32
    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 2
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 10
    config.train.eval_batches = 2
    config.train.sample_tokens = 20
    config.train.peak_flops = 1e11  # skip measuring the machine in tests
    config.checkpoint.every_steps = 10
    return config
