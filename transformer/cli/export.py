"""Export a GPT run as a Hugging Face model directory, or its LoRA adapters as a PEFT adapter.

    python -m transformer.export --workdir=runs/sft --out=exported/sft
    python -m transformer.export --workdir=runs/sft --out=exported/sft-adapter --adapter

The default writes `config.json`, `model.safetensors` (any LoRA adapters merged into the
weights), `tokenizer.json` and `tokenizer_config.json` (with the chat template of a chat run,
whose end-of-turn token becomes the EOS `generate` stops at): `transformers`'
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it as
it is. --adapter writes `adapter_config.json` and `adapter_model.safetensors`, which `peft`'s
`PeftModel.from_pretrained(base, OUT)` puts onto the base model: the Hugging Face directory the
run started from (checkpoint.init_from), or else the base weights, written to OUT/base.
GPT-2 and Llama-style runs export; an encoder-decoder run has no Hugging Face counterpart here.
"""

from __future__ import annotations

from typing import NoReturn

from absl import flags

from transformer.cli.entry import main_entry
from transformer.hf.runs import export_run

flags.DEFINE_string("workdir", None, "Run directory of a GPT training run.", required=True)
flags.DEFINE_string("out", None, "Directory to write the model (or adapter) into.", required=True)
flags.DEFINE_bool("adapter", False, "Write only the LoRA adapters, as a PEFT adapter.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def run() -> int:
    out = export_run(FLAGS.workdir, FLAGS.out, adapter=FLAGS.adapter, step=FLAGS.step)
    what = "PEFT adapter" if FLAGS.adapter else "Hugging Face model"
    print(f"wrote the {what} of {FLAGS.workdir} to {out}", flush=True)
    return 0


def main() -> NoReturn:
    main_entry(run, "transformer.export")
