"""Tokenise a run's corpus ahead of training, in bounded memory, all at once or shard by shard.

    python -m transformer.prepare --config=configs/gpt2_small.py \
        --config.data.corpus='jsonl:/data/owt/*.jsonl.zst' --workdir=runs/owt
    python train.py --config=configs/gpt2_small.py \
        --config.data.corpus='jsonl:/data/owt/*.jsonl.zst' --workdir=runs/owt   # reads the shards

The corpus is read as a stream of units (about `data.shard_mb` MB of input files each); each unit
is tokenised on every core and written as one memory-mapped token shard under `data.cache_dir`,
where `train.py` with the same data config finds it. A char or BPE tokenizer is first trained on
the first `data.tokenizer_sample_mb` MB of the training text and saved in --workdir (or in the
shard directory alone without one).

Shard by shard: `--shard=I --num_shards=N` prepares units I, I + N, ... only, so N commands (a
SLURM array, a Kubernetes job) sharing `data.cache_dir` prepare a corpus too big for one machine,
with no step to combine them afterwards. Rerunning a command (after a kill, say) skips the units
it already finished and redoes the one it was in.
"""

from __future__ import annotations

from typing import NoReturn

from absl import flags
from ml_collections import config_flags

from transformer.cli.entry import main_entry
from transformer.cli.flags import DEFAULT_CONFIG
from transformer.data.pipeline import prepare_corpus
from transformer.store.rundir import RunDir
from transformer.train.config import RunConfig

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    str(DEFAULT_CONFIG),
    "Run config file (configs/*.py); its `data` section says what to prepare.",
)
flags.DEFINE_string(
    "workdir", None, "Run directory: the tokenizer is read from it, or trained and saved there."
)
flags.DEFINE_integer("shard", 0, "Which slice of the units this command prepares (0-based).")
flags.DEFINE_integer("num_shards", 1, "How many commands share the work.")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")


def run() -> int:
    data_cfg = RunConfig.from_any(FLAGS.config).data
    prepared = prepare_corpus(
        data_cfg,
        tokenizer_path=RunDir(FLAGS.workdir).tokenizer_path if FLAGS.workdir else None,
        shard=FLAGS.shard,
        num_shards=FLAGS.num_shards,
        log=lambda message: print(message, flush=True),
    )
    if prepared.report is None:
        print(f"{prepared.corpus.name}: translation pairs tokenised into {prepared.cache_dir}.")
    else:
        print(prepared.report.summary(), flush=True)
    return 0


def main() -> NoReturn:
    main_entry(run, "transformer.prepare")
