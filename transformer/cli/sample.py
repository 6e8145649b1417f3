"""Sample from a trained GPT run, or chat with one trained on conversations.

    python -m transformer.sample --workdir=runs/default --prompt="ROMEO:" --max_new_tokens=300
    python -m transformer.sample --workdir=runs/sft --chat --prompt="Name three rivers."

Loads the newest checkpoint and the workdir's tokenizer; prints each continuation after its
prompt. With --chat (a run trained on a chat: or instruct: corpus) the prompt is a user turn,
rendered with the run's chat template after an optional --system message, and the assistant's
answer, up to its end-of-turn token, is printed. --temperature 0 is greedy; --top_k and --top_p
filter the distribution.
"""

from __future__ import annotations

from typing import NoReturn

from absl import flags

from transformer.cli.entry import main_entry
from transformer.errors import ConfigError
from transformer.inference import generate, reply
from transformer.store.rundir import RunDir

flags.DEFINE_string("workdir", None, "Run directory of a GPT training run.", required=True)
flags.DEFINE_string("prompt", "", "Text to continue ('' starts a new document).")
flags.DEFINE_integer(
    "max_new_tokens", 200, "Tokens to generate; past the context, it slides by half a context."
)
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the most likely tokens of this total mass.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("num_samples", 1, "Continuations of the same prompt.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_bool("chat", False, "The prompt is a user turn; print the assistant's answer.")
flags.DEFINE_string("system", "", "With --chat: a system message before the user turn.")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def run() -> int:
    if not 0.0 < FLAGS.top_p <= 1.0:
        raise ConfigError(f"--top_p={FLAGS.top_p} must be in (0, 1]")
    if FLAGS.temperature < 0 or FLAGS.top_k < 0 or FLAGS.max_new_tokens < 1:
        raise ConfigError("--temperature and --top_k must be >= 0 and --max_new_tokens >= 1")
    if FLAGS.num_samples < 1:
        raise ConfigError(f"--num_samples={FLAGS.num_samples} must be at least 1")
    if FLAGS.system and not FLAGS.chat:
        raise ConfigError("--system is a chat message: add --chat (a chat run's sampling)")
    run_dir = RunDir(FLAGS.workdir)
    cfg, params, tokenizer = run_dir.load(FLAGS.step)
    sampling = dict(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,
    )
    if FLAGS.chat:
        chat = run_dir.load_chat()
        if chat is None:
            raise ConfigError(
                f"{FLAGS.workdir} did not train on conversations (it has no chat.json); "
                "drop --chat, or train on a chat: or instruct: corpus"
            )
        system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
        messages = system + [{"role": "user", "content": FLAGS.prompt}]
        texts = reply(cfg, params, tokenizer, chat, [messages] * FLAGS.num_samples, **sampling)
        shown = ""
    else:
        texts = generate(cfg, params, tokenizer, [FLAGS.prompt] * FLAGS.num_samples, **sampling)
        shown = FLAGS.prompt
    for i, text in enumerate(texts):
        if FLAGS.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(shown + text, flush=True)
    return 0


def main() -> NoReturn:
    main_entry(run, "transformer.sample")
