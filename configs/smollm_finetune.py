"""Fine-tune a SmolLM-135M-shaped Llama checkpoint (a Hugging Face directory) on your text.

    python train.py --config=configs/smollm_finetune.py --workdir=runs/smollm \\
        --config.checkpoint.init_from=PATH/TO/SmolLM-135M \\
        --config.data.tokenizer_path=PATH/TO/SmolLM-135M \\
        --config.data.corpus='text:my_texts/*.txt'
    python -m transformer.sample --workdir=runs/smollm --prompt="Once upon a time"

The directory is what `save_pretrained` writes (config.json, model.safetensors) plus the model's
tokenizer.json; the model fields below are `preset('smollm_135m')`, which is that checkpoint's
shape, and a different checkpoint is refused with the fields that differ. For another Llama-style
model, change the model fields to its config.json's (`transformer.hf.config_from_hf` gives
them: `config_from_hf(json.load(open('config.json'))).to_dict()`).
"""

from transformer.model.config import PRESETS
from transformer.train.config import base_config


def get_config():
    config = base_config()
    config.model.update(PRESETS["smollm_135m"])
    config.model.update(vocab_size=0)  # the tokenizer's 49152 tokens
    config.data.corpus = "shakespeare"
    config.data.tokenizer = "hf"  # the model's own tokenizer.json, from data.tokenizer_path
    config.data.seq_len = 512
    config.train.num_steps = 500
    config.train.batch_size = 8
    config.train.learning_rate = 1e-4
    config.train.min_learning_rate = 1e-5
    config.train.warmup_steps = 20
    config.train.weight_decay = 0.0
    config.train.log_every_steps = 20
    config.train.eval_every_steps = 100
    config.train.eval_batches = 10
    config.checkpoint.every_steps = 100
    return config
