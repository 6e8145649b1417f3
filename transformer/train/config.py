"""The run config, typed: `RunConfig` of `model`, `data`, `train`, `checkpoint` and `mesh`.

Each layer owns its section: `model` is `transformer.model.config.ModelConfig`, `data` is
`transformer.data.config.DataConfig`, and the sections of training are below. Config files
(`configs/*.py`) and the command line work on the `ml_collections.ConfigDict` that
`base_config()` builds from the dataclasses; `RunConfig.from_any` turns it into frozen
dataclasses once, at the edge, and every value is checked there, before anything is written or
compiled. A wrong value is a `ConfigError` naming the field, the value and the fix. The comment
after each field is its documentation (`train.py --help` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from transformer.data.config import DataConfig
from transformer.data.corpora import corpus_kind
from transformer.errors import ConfigError, check_fields, one_of
from transformer.model.config import ModelConfig, padded_vocab_size

# Model fields the run derives (from the tokenizer), never set in a config.
DERIVED_MODEL_FIELDS = ("real_vocab_size",)
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
# train.prng_impl -> JAX's name of the generator (`jax.random.key(seed, impl=...)`): threefry is
# JAX's default, the same bits on any device count; rbg and unsafe_rbg hash less on GPUs and TPUs.
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
NONFINITE_POLICIES = ("stop", "skip")


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
    prng_impl: str = "threefry"  # random numbers of init and dropout: threefry | rbg | unsafe_rbg
    log_every_steps: int = 50  # metrics.jsonl / TensorBoard / progress bar
    eval_every_steps: int = 250  # held-out loss; 0 = only at the end
    eval_batches: int = 20  # batches per evaluation; 0 = the whole split
    eval_tasks: str = ""  # GPT: lm-eval tasks (comma list) at evaluation steps; needs [eval]
    eval_tasks_path: str = ""  # directory of your own lm-eval task YAML files
    eval_tasks_limit: float = 0.0  # documents per task (below 1: that share); 0 = all
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
            ("schedule", *one_of(self.schedule, SCHEDULES)),
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
            ("eval_tasks_limit", self.eval_tasks_limit >= 0, ">= 0 (0 = every document)"),
            ("sample_tokens", self.sample_tokens >= 0, ">= 0 (0 = no sample)"),
            ("bleu_pairs", self.bleu_pairs >= 0, ">= 0 (0 = no BLEU)"),
            ("beam_size", self.beam_size >= 1, "must be at least 1 (1 = greedy)"),
            ("beam_alpha", self.beam_alpha >= 0, at_least_0),
            ("peak_flops", self.peak_flops >= 0, ">= 0 (0 = published or measured)"),
            ("nonfinite", *one_of(self.nonfinite, NONFINITE_POLICIES)),
            ("prng_impl", *one_of(self.prng_impl, tuple(PRNG_IMPLS))),
        ]
        check_fields("train", self, rules)

    @property
    def task_names(self) -> list[str]:
        """`eval_tasks` as a list of names."""
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    @property
    def last_step(self) -> int:
        """The step this invocation stops at: `stop_at_step` if set, else `num_steps`."""
        return min(self.stop_at_step or self.num_steps, self.num_steps)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # also at the end and on SIGTERM/SIGINT
    keep: int = 3  # newest checkpoints kept; 0 = all
    init_from: str = ""  # fine-tune from a workdir or a Hugging Face GPT-2 or Llama directory

    def __post_init__(self) -> None:
        check_fields(
            "checkpoint",
            self,
            [
                ("every_steps", self.every_steps >= 1, "must be at least 1"),
                ("keep", self.keep >= 0, "must be >= 0 (0 keeps every checkpoint)"),
                (
                    "init_from",
                    not self.init_from or os.path.isdir(os.path.expanduser(self.init_from)),
                    "no such directory; give a run's workdir or a Hugging Face GPT-2 or Llama "
                    "directory",
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
        check_fields("mesh", self, [(k, v == -1 or v >= 1, fix) for k, v in sizes.items()])
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
    config = ml_collections.ConfigDict()
    model = {**dataclasses.asdict(ModelConfig()), "vocab_size": 0}
    for field in DERIVED_MODEL_FIELDS:
        del model[field]
    config.model = ml_collections.ConfigDict(model)
    for name, section in SECTIONS.items():
        config[name] = ml_collections.ConfigDict(dataclasses.asdict(section()))
    return config


def load_config_file(path: str | os.PathLike[str]) -> Any:
    """`get_config()` of a config file (configs/NAME.py), as `train.py --config=PATH` loads it;
    one config can start from another: `load_config_file(Path(__file__).with_name(...))`."""
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
        _reject_unknown("model", self.model, ModelConfig)
        vocab = self.model.get("vocab_size", 0)
        if not isinstance(vocab, int) or vocab < 0:
            raise ConfigError(
                f"model.vocab_size={vocab!r}: must be >= 0 (0 = the tokenizer's size)"
            )
        cfg = ModelConfig.from_dict({**self.model, "vocab_size": vocab or 1, "real_vocab_size": 0})
        if self.data.seq_len > cfg.max_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is longer than model.max_len={cfg.max_len}, "
                "the longest sequence the model takes; lower data.seq_len or raise model.max_len"
            )
        # Before any data is read: a GPT trains on documents, an encoder-decoder on pairs.
        kind = corpus_kind(self.data.corpus)
        if (kind != "translation") != cfg.is_decoder_only:
            wanted = (
                ("an encoder-decoder", "translation") if kind == "translation" else ("a GPT", kind)
            )
            raise ConfigError(
                f"data.corpus={self.data.corpus!r} is a {kind} corpus but the model is "
                f"{cfg.describe()}; use a {wanted[1]} corpus or {wanted[0]} config"
            )
        if self.train.task_names and not cfg.is_decoder_only:
            raise ConfigError(
                f"train.eval_tasks={self.train.eval_tasks!r}: lm-eval tasks score a GPT, but the "
                f"model is {cfg.describe()}; drop train.eval_tasks (BLEU scores translation)"
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
            _reject_unknown(name, given, section)
            sections[name] = section(**given)
        return cls(model=values.get("model") or {}, **sections)

    def model_config(self, tokenizer_vocab_size: int) -> ModelConfig:
        """The ModelConfig, with vocab_size 0 = the tokenizer's size rounded up to
        `data.pad_vocab_to_multiple_of`, and `real_vocab_size` the tokenizer's size: the one
        place the vocabulary is decided (padded ids are never produced or predicted)."""
        values = {**self.model, "real_vocab_size": tokenizer_vocab_size}
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


def _reject_unknown(section: str, given: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(unknown_field_message(f"{section}.{unknown[0]}"))


# ---------------------------------------------------------------------------------------------
# Field names and their documentation, for --help and for "did you mean".


def all_field_names() -> list[str]:
    """Every `section.field` a run config has."""
    names = [
        f"model.{f.name}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in DERIVED_MODEL_FIELDS
    ]
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
            if section == "model" and f.name in DERIVED_MODEL_FIELDS:
                continue
            value = values.get(section, {}).get(f.name, f.default)
            doc = docs.get(f.name, "")
            if section == "model" and f.name == "vocab_size":
                doc = "embedding rows; 0 = the tokenizer's size, padded"
            lines.append(f"  --config.{section}.{f.name}={value!r}".ljust(50) + f"  {doc}")
    return "\n".join(lines)
