"""Supervised fine-tuning with LoRA: a Llama-style Hugging Face directory (SmolLM-135M's shape
here) on conversations, the loss on the assistant's answers only.

    python train.py --config=configs/sft_lora.py --workdir=runs/sft \\
        --config.checkpoint.init_from=PATH/TO/SmolLM-135M-Instruct \\
        --config.data.tokenizer_path=PATH/TO/SmolLM-135M-Instruct \\
        --config.data.corpus='chat:my_chats/*.jsonl'
    python -m transformer.sample --workdir=runs/sft --chat --prompt="Name three rivers."
    python -m transformer.export --workdir=runs/sft --out=exported/sft            # merged
    python -m transformer.export --workdir=runs/sft --out=exported/sft --adapter  # PEFT

Each JSON line is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
(or, with `instruct:GLOB`, {"prompt": ..., "completion": ...}). The model directory's chat
template (tokenizer_config.json) renders them as `transformers` does; without one, ChatML. Rank-8
adapters on every projection train; the base stays frozen (no optimizer state for it) and may
be stored in bfloat16 (`--config.model.param_dtype=bfloat16`). For another Llama-style model,
set the model fields to its config.json's (`transformer.hf.config_from_hf` gives them).
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["smollm_135m"])
    config.model.update(
        vocab_size=0,  # the tokenizer's
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets="q,k,v,o,gate,up,down",
        lora_dropout=0.05,
    )
    config.data.corpus = "chat:chats/*.jsonl"
    config.data.tokenizer = "hf"  # the model's own tokenizer.json and chat template
    config.data.seq_len = 1024
    config.data.pack = True  # several conversations per row, attention kept within each
    config.train.num_steps = 1000
    config.train.batch_size = 16
    config.train.learning_rate = 2e-4  # adapters take a larger rate than full fine-tuning
    config.train.min_learning_rate = 2e-5
    config.train.warmup_steps = 30
    config.train.weight_decay = 0.0
    config.train.log_every_steps = 20
    config.train.eval_every_steps = 200
    config.train.eval_batches = 10
    config.checkpoint.every_steps = 200
    return config
