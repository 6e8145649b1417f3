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

from absl import flags

flags.DEFINE_string("workdir", None, "Run directory of an encoder-decoder run.", required=True)
flags.DEFINE_string("input", "-", "File of source sentences, one per line ('-' = stdin).")
flags.DEFINE_string("output", "-", "Where to write translations ('-' = stdout).")
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.")
flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (Wu et al., 2016).")
flags.DEFINE_integer("batch_size", 32, "Sentences decoded together.")
flags.DEFINE_bool("bleu", False, "Translate the run's held-out pairs and print BLEU.")
flags.DEFINE_integer("max_pairs", 500, "With --bleu: how many held-out pairs to score.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def held_out_pairs(data_cfg: dict) -> list[tuple[str, str]]:
    """The run's test pairs where its corpus has a test split, else its validation pairs."""
    from transformer.corpora import load_corpus
    from transformer.data import DataError

    corpus = load_corpus(
        data_cfg["corpus"],
        text_field=data_cfg.get("text_field", "text"),
        cache_dir=data_cfg.get("cache_dir") or None,
    )
    if corpus.kind != "translation":
        raise DataError(f"--bleu needs a translation corpus; the run used {data_cfg['corpus']}")
    splits = corpus.splits
    return list(splits.get("test") or splits["validation"])


def main() -> int:
    from transformer.inference import bleu, translate
    from transformer.rundir import RunDir

    run = RunDir(FLAGS.workdir)
    cfg, params, tokenizer = run.load(FLAGS.step)
    if FLAGS.bleu:
        pairs = held_out_pairs(run.read_config()["data"])[: FLAGS.max_pairs]
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


if __name__ == "__main__":
    from transformer.cli import main_entry

    main_entry(main, "transformer.translate")
