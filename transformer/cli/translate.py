r"""Translate with a trained encoder-decoder run, or score it with BLEU.

    echo "In the beginning God created the heavens and the earth." | \
        python -m transformer.translate --workdir=runs/translation_en_de
    python -m transformer.translate --workdir=DIR --input=source.txt --output=out.txt
    python -m transformer.translate --workdir=DIR --bleu        # held-out pairs of the run

Beam search with the paper's settings by default: beam 4, length penalty alpha 0.6, at most
input length + 50 tokens (sec. 6.1). --beam_size=1 is greedy decoding.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags

from transformer.cli.entry import main_entry
from transformer.data.pipeline import held_out_pairs
from transformer.inference import bleu, translate
from transformer.store.rundir import RunDir

flags.DEFINE_string("workdir", None, "Run directory of an encoder-decoder run.", required=True)
flags.DEFINE_string("input", "-", "File of source sentences, one per line ('-' = stdin).")
flags.DEFINE_string("output", "-", "Where to write translations ('-' = stdout).")
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.")
flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (Wu et al., 2016).")
flags.DEFINE_integer("batch_size", 32, "Sentences decoded together.")
flags.DEFINE_bool(
    "bleu",
    False,
    "Translate pairs the run never trained on (the corpus's test split, else its validation "
    "split: data.eval_corpus or the held-out files) and print BLEU.",
)
flags.DEFINE_integer("max_pairs", 500, "With --bleu: how many held-out pairs to score.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def run() -> int:
    rundir = RunDir(FLAGS.workdir)
    cfg, params, tokenizer = rundir.load(FLAGS.step)
    if FLAGS.bleu:
        pairs = held_out_pairs(rundir.read_config()["data"])[: FLAGS.max_pairs]
        score, _ = bleu(cfg, params, tokenizer, pairs, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha)
        print(
            f"BLEU {score:.2f} on {len(pairs)} held-out pairs (beam {FLAGS.beam_size}, "
            f"alpha {FLAGS.alpha})"
        )
        return 0
    if FLAGS.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(FLAGS.input, encoding="utf-8") as f:
            lines = f.read().splitlines()
    outputs = translate(
        cfg,
        params,
        tokenizer,
        lines,
        beam_size=FLAGS.beam_size,
        alpha=FLAGS.alpha,
        batch_size=FLAGS.batch_size,
    )
    text = "".join(line + "\n" for line in outputs)
    if FLAGS.output == "-":
        sys.stdout.write(text)
    else:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def main() -> NoReturn:
    main_entry(run, "transformer.translate")
