"""The run config, typed: `RunConfig` of `model`, `data`, `train`, `checkpoint` and `mesh`.

Config files (`configs/*.py`) and the command line work on the `ml_collections.ConfigDict` that
`base_config()` builds from the dataclasses below; `RunConfig.from_any`
turns it into frozen dataclasses once, at the edge, and every value is checked there, before
anything is written or compiled. A wrong value is a `ConfigError` naming the field, the value
and the fix. The comment after each field is its documentation (`train.py --help` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

from transformer.config import ConfigError, ModelConfig, padded_vocab_size

TOKENIZERS = ("char", "bpe", "gpt2", "hf")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
NONFINITE_POLICIES = ("stop", "skip")


def _check(section: str, cfg: Any, rules: list[tuple[str, bool, str]]) -> None:
    """Raises a ConfigError for the first rule `(field, ok, fix)` that fails."""
    for field, ok, fix in rules:
        if not ok:
            raise ConfigError(f"{section}.{field}={getattr(cfg, field)!r}: {fix}")


def _one_of(value: Any, allowed: tuple[str, ...]) -> tuple[bool, str]:
    return value in allowed, f"must be one of {', '.join(allowed)}"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "shakespeare"  # shakespeare | bible_en_de | text|jsonl|parquet|tsv:GLOB | hf:DIR
    eval_corpus: str = ""  # held-out files of the same kind; '' = the last ~10% of corpus
    tokenizer: str = "char"  # char | bpe | gpt2 (data.gpt2_vocab) | hf (data.tokenizer_path)
    vocab_size: int = 4096  # BPE target size (ignored for char and gpt2)
    seq_len: int = 256  # LM context; for translation the source and target max length
    text_field: str = "text"  # field (jsonl) or column (parquet, hf) holding the text
    gpt2_vocab: str = ""  # directory with vocab.json + merges.txt for tokenizer=gpt2
    tokenizer_path: str = ""  # tokenizer=hf: a model directory's tokenizer.json (or the file)
    cache_dir: str = ""  # tokenised corpora and downloads; '' = $TRANSFORMER_DATA_CACHE
    shard_mb: float = 64.0  # input MB per token shard (the unit of `transformer.prepare` work)
    tokenizer_sample_mb: float = 100.0  # char/bpe tokenizers learn from this much training text
    pad_vocab_to_multiple_of: int = 64  # embedding rows rounded up for fast matmuls
    pack: bool = False  # translation: pack several pairs per row (segment ids)
    truncate: bool = True  # translation: cut pairs longer than seq_len (False: error)

    def __post_init__(self) -> None:
        ok, choices = _one_of(self.tokenizer, TOKENIZERS)
        gpt2_dir = os.path.expanduser(self.gpt2_vocab)
        hf_path = os.path.expanduser(self.tokenizer_path)
        if os.path.isdir(hf_path):
            hf_path = os.path.join(hf_path, "tokenizer.json")
        _check(
            "data",
            self,
            [
                ("corpus", bool(self.corpus), "name a corpus, e.g. shakespeare or text:DIR/*.txt"),
                ("tokenizer", ok, choices),
                ("seq_len", self.seq_len >= 2, "must be at least 2"),
                ("vocab_size", self.tokenizer != "bpe" or self.vocab_size > 0, "must be > 0"),
                ("pad_vocab_to_multiple_of", self.pad_vocab_to_multiple_of >= 1, "must be >= 1"),
                ("shard_mb", self.shard_mb > 0, "must be positive"),
                ("tokenizer_sample_mb", self.tokenizer_sample_mb > 0, "must be positive"),
                (
                    "gpt2_vocab",
                    self.tokenizer != "gpt2" or os.path.isdir(gpt2_dir),
                    "tokenizer=gpt2 needs the directory holding GPT-2's vocab.json and "
                    "merges.txt; pass --config.data.gpt2_vocab=DIR",
                ),
                (
                    "tokenizer_path",
                    self.tokenizer != "hf" or os.path.isfile(hf_path),
                    "tokenizer=hf needs a tokenizer.json, or the model directory holding one "
                    "(e.g. the checkpoint.init_from directory); pass "
                    "--config.data.tokenizer_path=DIR",
                ),
            ],
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1000  # optimizer steps (also the length of the lr schedule)
    stop_at_step: int = 0  # stop early with a checkpoint (resume later); 0 = num_steps
    batch_size: int = 32  # global batch (sequences), split over data x fsdp
    learning_rate: float = 1e-3  # peak lr (cosine, constant); a factor for inverse_sqrt
    min_learning_rate: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | inverse_sqrt (paper eq. 3) | constant
    b1: float = 0.9  # Adam beta1
    b2: float = 0.99  # Adam beta2 (0.98 in the paper, 0.95 for GPT-2 scale)
    eps: float = 1e-8  # Adam epsilon (1e-9 in the paper)
    weight_decay: float = 0.1  # AdamW decay on matrices (not biases, norms, embeddings)
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    label_smoothing: float = 0.0  # 0.1 in the paper
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide)
    seed: int = 0  # parameters, dropout and data order
    log_every_steps: int = 50  # metrics.jsonl / TensorBoard / progress bar
    eval_every_steps: int = 250  # held-out loss; 0 = only at the end
    eval_batches: int = 20  # batches per evaluation; 0 = the whole split
    sample_tokens: int = 300  # GPT: characters/tokens sampled at the end; 0 = none
    bleu_pairs: int = 200  # translation: held-out pairs scored with BLEU at the end
    beam_size: int = 4  # translation: beam width for BLEU (sec. 6.1)
    beam_alpha: float = 0.6  # translation: length penalty (sec. 6.1, Wu et al. 2016)
    peak_flops: float = 0.0  # per-device FLOP/s for MFU; 0 = published or measured
    nonfinite: str = "stop"  # non-finite loss: stop (after saving last good) | skip

    def __post_init__(self) -> None:
        positive = "must be positive"
        at_least_0 = "must be >= 0"
        rules = [
            ("num_steps", self.num_steps >= 1, "must be at least 1"),
            ("stop_at_step", self.stop_at_step >= 0, "must be >= 0 (0 = train.num_steps)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1 sequence"),
            ("learning_rate", self.learning_rate > 0, f"{positive}, e.g. 1e-3"),
            ("min_learning_rate", self.min_learning_rate >= 0, at_least_0),
            ("warmup_steps", self.warmup_steps >= 0, at_least_0),
            ("schedule", *_one_of(self.schedule, SCHEDULES)),
            ("b1", 0 <= self.b1 < 1, "must be in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "must be in [0, 1)"),
            ("eps", self.eps > 0, positive),
            ("weight_decay", self.weight_decay >= 0, at_least_0),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, "must be at least 1"),
            (
                "batch_size",
                self.batch_size % self.grad_accum_steps == 0,
                f"must be a multiple of train.grad_accum_steps={self.grad_accum_steps}",
            ),
            ("log_every_steps", self.log_every_steps >= 1, "must be at least 1"),
            ("eval_every_steps", self.eval_every_steps >= 0, ">= 0 (0 = only at the end)"),
            ("eval_batches", self.eval_batches >= 0, ">= 0 (0 = the whole split)"),
            ("sample_tokens", self.sample_tokens >= 0, ">= 0 (0 = no sample)"),
            ("bleu_pairs", self.bleu_pairs >= 0, ">= 0 (0 = no BLEU)"),
            ("beam_size", self.beam_size >= 1, "must be at least 1 (1 = greedy)"),
            ("beam_alpha", self.beam_alpha >= 0, at_least_0),
            ("peak_flops", self.peak_flops >= 0, ">= 0 (0 = published or measured)"),
            ("nonfinite", *_one_of(self.nonfinite, NONFINITE_POLICIES)),
        ]
        _check("train", self, rules)

    @property
    def last_step(self) -> int:
        """The step this invocation stops at: `stop_at_step` if set, else `num_steps`."""
        return min(self.stop_at_step or self.num_steps, self.num_steps)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # also at the end and on SIGTERM/SIGINT
    keep: int = 3  # newest checkpoints kept; 0 = all
    init_from: str = ""  # fine-tune from a workdir or a Hugging Face GPT-2 dir

    def __post_init__(self) -> None:
        _check(
            "checkpoint",
            self,
            [
                ("every_steps", self.every_steps >= 1, "must be at least 1"),
                ("keep", self.keep >= 0, "must be >= 0 (0 keeps every checkpoint)"),
                (
                    "init_from",
                    not self.init_from or os.path.isdir(os.path.expanduser(self.init_from)),
                    "no such directory; give a run's workdir or a Hugging Face GPT-2 directory",
                ),
            ],
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel size; -1 = the devices the other axes leave
    fsdp: int = 1  # fully sharded data parallel size
    tensor: int = 1  # tensor (Megatron) parallel size

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        fix = "must be a positive size, or -1 for the devices the other axes leave"
        _check("mesh", self, [(k, v == -1 or v >= 1, fix) for k, v in sizes.items()])
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(
                f"mesh data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}: at most one "
                "axis may be -1; give the others a size"
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
}


def base_config() -> Any:
    """Every field a run config has, with its default; `configs/*.py` start from this.

    An `ml_collections.ConfigDict` built from `ModelConfig` and the sections above, so the
    command line can override any field (`--config.train.num_steps=100`) and rejects unknown
    keys and wrong types. model.vocab_size 0 = the tokenizer's size rounded up to
    data.pad_vocab_to_multiple_of.
    """
    import ml_collections

    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({**dataclasses.asdict(ModelConfig()), "vocab_size": 0})
    for name, section in SECTIONS.items():
        config[name] = ml_collections.ConfigDict(dataclasses.asdict(section()))
    return config


def load_config_file(path: str | os.PathLike[str]) -> Any:
    """`get_config()` of a config file (configs/NAME.py), as `train.py --config=PATH` loads it;
    one config can start from another: `load_config_file(Path(__file__).with_name(...))`."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise ConfigError(f"cannot load config file {str(path)!r}; pass a configs/NAME.py file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run is given. `model` holds the `ModelConfig` fields as a dict
    because its `vocab_size` may be 0 (= the tokenizer's size, known only once the data is
    read); `model_config(vocab_size)` resolves it."""

    model: Mapping[str, Any]
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model))
        _check_fields("model", self.model, ModelConfig)
        vocab = self.model.get("vocab_size", 0)
        if not isinstance(vocab, int) or vocab < 0:
            raise ConfigError(
                f"model.vocab_size={vocab!r}: must be >= 0 (0 = the tokenizer's size)"
            )
        cfg = ModelConfig.from_dict({**self.model, "vocab_size": vocab or 1})  # checks the rest
        if self.data.seq_len > cfg.max_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is longer than model.max_len={cfg.max_len}, "
                "the longest sequence the model takes; lower data.seq_len or raise model.max_len"
            )

    @classmethod
    def from_any(cls, config: Any) -> RunConfig:
        """From a RunConfig, a `ConfigDict` or a plain nested dict (e.g. a saved config.json).
        Missing fields take their defaults; unknown ones are a ConfigError."""
        if isinstance(config, RunConfig):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        unknown = sorted(set(values) - {"model", *SECTIONS})
        if unknown:
            raise ConfigError(unknown_field_message(unknown[0]))
        sections = {}
        for name, section in SECTIONS.items():
            given = dict(values.get(name) or {})
            _check_fields(name, given, section)
            sections[name] = section(**given)
        return cls(model=values.get("model") or {}, **sections)

    def model_config(self, tokenizer_vocab_size: int) -> ModelConfig:
        """The ModelConfig, with vocab_size 0 = the tokenizer's size rounded up to
        `data.pad_vocab_to_multiple_of` (padded ids are never produced or predicted)."""
        values = dict(self.model)
        if values.get("vocab_size", 0) == 0:
            multiple = self.data.pad_vocab_to_multiple_of
            values["vocab_size"] = padded_vocab_size(tokenizer_vocab_size, multiple)
        elif values["vocab_size"] < tokenizer_vocab_size:
            raise ConfigError(
                f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
                f"{tokenizer_vocab_size} tokens; set model.vocab_size=0 to size it from the "
                "tokenizer"
            )
        return ModelConfig.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"model": dict(self.model), **out}


def _check_fields(section: str, given: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(unknown_field_message(f"{section}.{unknown[0]}"))


# ---------------------------------------------------------------------------------------------
# Field names and their documentation, for --help and for "did you mean".


def all_field_names() -> list[str]:
    """Every `section.field` a run config has."""
    names = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    for section, cls in SECTIONS.items():
        names += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return names


def unknown_field_message(path: str) -> str:
    """'unknown config field `train.num_stesp`; did you mean `train.num_steps`?'"""
    names = all_field_names()
    if "." not in path:  # a section
        sections = ["model", *SECTIONS]
        close = difflib.get_close_matches(path, sections, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"sections: {', '.join(sections)}"
        return f"unknown config section `{path}`; {hint}"
    section, _, field = path.partition(".")
    if section not in ["model", *SECTIONS]:
        fixed = difflib.get_close_matches(section, ["model", *SECTIONS], n=1)
        section = fixed[0] if fixed else section
    close = difflib.get_close_matches(f"{section}.{field}", names, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else "`train.py --help` lists every field"
    return f"unknown config field `{path}`; {hint}"


_FIELD_LINE = re.compile(r"^\s+(\w+):\s*[^=]+=\s*(.+?)\s+#\s*(.+)$")


def field_docs(cls: type) -> dict[str, str]:
    """The comment after each field of a config dataclass: its one-line documentation."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            docs[match.group(1)] = match.group(3)
    return docs


def describe(config: Any) -> str:
    """Every field of `config` (a ConfigDict or RunConfig) with its value and documentation,
    grouped by section: the body of `train.py --help`."""
    values = config.to_dict()
    classes = {"model": ModelConfig, **SECTIONS}
    lines = []
    for section, cls in classes.items():
        docs = field_docs(cls)
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            value = values.get(section, {}).get(f.name, f.default)
            doc = docs.get(f.name, "")
            if section == "model" and f.name == "vocab_size":
                doc = "embedding rows; 0 = the tokenizer's size, padded"
            lines.append(f"  --config.{section}.{f.name}={value!r}".ljust(50) + f"  {doc}")
    return "\n".join(lines)
