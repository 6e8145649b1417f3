"""The paper's base model and training recipe ("Attention Is All You Need", sec. 5).

    python train.py --config=configs/transformer_base.py --workdir=runs/base \
        --config.data.corpus='tsv:/path/to/train.tsv'

Encoder-decoder, 6+6 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1, shared 37k BPE
vocabulary; Adam (0.9, 0.98, 1e-9), inverse-sqrt schedule with 4000 warmup steps (eq. 3),
label smoothing 0.1, 100k steps. The paper's batches held about 25k source + 25k target
tokens on 8 GPUs; here 256 pairs of up to 128 tokens, on whatever mesh you give it.
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["transformer_base"])
    config.model.update(vocab_size=0, max_len=256, dtype="bfloat16")
    config.data.corpus = "bible_en_de"  # replace with tsv:GLOB (source<TAB>target per line)
    config.data.tokenizer = "bpe"
    config.data.vocab_size = 37000
    config.data.seq_len = 128
    config.train.num_steps = 100000
    config.train.batch_size = 256
    config.train.schedule = "inverse_sqrt"
    config.train.learning_rate = 1.0  # a factor on eq. 3
    config.train.warmup_steps = 4000
    config.train.b1 = 0.9
    config.train.b2 = 0.98
    config.train.eps = 1e-9
    config.train.weight_decay = 0.0  # plain Adam in the paper
    config.train.grad_clip = 0.0
    config.train.label_smoothing = 0.1
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 5000
    config.train.sample_tokens = 0
    config.checkpoint.every_steps = 5000
    return config
