"""GPT-2 small (124M), byte-level BPE, context 1024: for a GPU or TPU and your own corpus.

    python train.py --config=configs/gpt2_small.py --workdir=runs/gpt2 \
        --config.data.corpus='text:/path/to/corpus/*.txt'

Trains a 50k BPE on the corpus (or use --config.data.tokenizer=gpt2
--config.data.gpt2_vocab=DIR with GPT-2's vocab.json + merges.txt, and fine-tune from
Hugging Face weights with --config.checkpoint.init_from=HF_DIR). Batch 480 x 1024 tokens per
step (about 0.5M, as GPT-2) through gradient accumulation; change mesh.* to shard it.

The speed settings are the fastest measured on one GPU (an H200; `bash benchmarks/gpu_check.sh`
prints tokens/s and peak memory; docs/performance.md): micro-batches of 16 x 1024, no
rematerialisation, layers unrolled. On one H200 with cuDNN attention the step peaked at 19.9 GiB
with the float32 loss it had then; the fused loss (model.loss_impl) keeps no float32 copy of
the [16, 1024, 50304] logits (3 GiB). Without cuDNN attention the [b, n, t, t] scores add a few
GB per layer. `kernels` and `attention_impl` 'auto'
take XLA-fused reference ops and cuDNN attention on a GPU and the hand-written kernels on a CPU.
Short of memory: --config.model.remat_policy=dots_with_no_batch_dims,
--config.model.loss_chunk_len=128, or fewer sequences per micro-batch.
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["gpt2_small"])
    config.model.update(
        vocab_size=0,  # tokenizer size padded to a multiple of 64 (50257 -> 50304)
        dtype="bfloat16",
        # Unrolled: 7% more tokens/s than nn.scan on an H200, for a longer compile (one layer
        # per layer; benchmarks/compile_time.py); no remat: 5% more than remat of the dots.
        scan_layers=False,
        remat_policy="none",
        attention_impl="auto",  # cuDNN's fused attention on a GPU
        attention_dropout_rate=0.0,  # what cuDNN allows; pretraining on a large corpus needs none
        kernels="auto",
    )
    config.data.corpus = "shakespeare"  # replace with text:GLOB or jsonl:GLOB
    config.data.tokenizer = "bpe"
    config.data.vocab_size = 50257
    config.data.seq_len = 1024
    config.train.num_steps = 600000
    config.train.batch_size = 480
    config.train.grad_accum_steps = 30  # 16 sequences per micro-batch; fewer on bigger meshes
    config.train.learning_rate = 6e-4
    config.train.min_learning_rate = 6e-5
    config.train.warmup_steps = 2000
    config.train.b2 = 0.95
    config.train.weight_decay = 0.1
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 1000
    config.train.eval_batches = 200
    config.checkpoint.every_steps = 1000
    return config
