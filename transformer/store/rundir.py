"""A run directory (the `--workdir`): its layout, the one atomic writer, and loading a run.

    DIR/config.json        the resolved run config (model.vocab_size filled in)
    DIR/tokenizer.json     the tokenizer the run trained or was given
    DIR/chat.json          a chat run's format: template, tokens, end of turn (data.chat)
    DIR/checkpoints/       Orbax checkpoints, one directory per step (transformer.store.checkpoint)
    DIR/metrics.jsonl      one JSON object per logged step
    DIR/events.out.tfevents.*   TensorBoard

Training, sampling, translating, fine-tuning and the notebooks all go through `RunDir`:

    model_cfg, params, tokenizer = RunDir("runs/default").load()   # = load_run("runs/default")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from transformer.data.chat import CHAT_FILE, ChatFormat
from transformer.data.tokenizer import TOKENIZER, Tokenizer
from transformer.errors import CheckpointError, ConfigError
from transformer.files import write_text_atomic
from transformer.model.config import ModelConfig
from transformer.model.models import init_variables
from transformer.store.checkpoint import Checkpoints

log = logging.getLogger(__name__)

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class RunDir:
    """One training run's directory. Creating the object touches nothing on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def is_run(self) -> bool:
        """Whether a training run has started here (it wrote its config)."""
        return self.config_path.is_file()

    # ----------------------------------------------------------------------- the config
    def read_config(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"no run directory {self.path}; pass the --workdir of a training run"
            )
        if not self.is_run():
            raise FileNotFoundError(
                f"{self.config_path} is missing: {self.path} is not a training run's workdir"
            )
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(self.config_path, json.dumps(config, indent=2, sort_keys=True))

    def check_resumable(self, model_cfg: ModelConfig, prng_impl: str) -> None:
        """A workdir holds one run: resuming it with a different model or another random-number
        generator is an error, not a guess (`ModelConfig.differences`: fields of how a model is
        computed may change)."""
        if not self.is_run():
            return
        config = self.read_config()
        saved_impl = config.get("train", {}).get("prng_impl", "threefry")  # older runs: threefry
        if saved_impl != prng_impl:
            raise ConfigError(
                f"workdir {self.path} was trained with train.prng_impl={saved_impl!r}, not "
                f"{prng_impl!r}; resume it with --config.train.prng_impl={saved_impl} or use a "
                "new --workdir"
            )
        saved = config.get("model", {})
        # Fields a run saved before they existed take this run's values.
        saved_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **saved})
        diffs = [
            f"model.{k}: {old!r} -> {new!r}" for k, old, new in model_cfg.differences(saved_cfg)
        ]
        if diffs:
            raise ConfigError(
                f"workdir {self.path} holds a run of a different model ({'; '.join(diffs)}); "
                "use a new --workdir, or the same model settings to resume"
            )

    # ----------------------------------------------------------------------- contents
    def checkpoints(self, *, keep: int = 3, read_only: bool = False) -> Checkpoints:
        return Checkpoints(str(self.checkpoints_path), keep=keep, read_only=read_only)

    def load_tokenizer(self) -> Any:
        return Tokenizer.load(self.tokenizer_path)

    def load_chat(self) -> ChatFormat | None:
        """The run's chat format; None for a run that did not train on conversations."""
        path = self.path / CHAT_FILE
        return ChatFormat.load(path) if path.is_file() else None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics(self, step: int) -> int:
        """Drops `metrics.jsonl` records with a step past `step` (and any torn last line),
        atomically; returns how many records were dropped.

        A run killed after logging step N but before its checkpoint at N completed logs N again
        when it resumes; after this the file holds each step once, as an uninterrupted run
        writes it. TensorBoard event files are append-only and keep the replaced points
        (TensorBoard shows the newest value per step); `metrics.jsonl` is the record to trust.
        """
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        dropped = len([line for line in lines if line.strip()]) - len(kept)
        if dropped:
            write_text_atomic(self.metrics_path, "".join(kept))
        return dropped

    # ----------------------------------------------------------------------- loading a run
    def load_params(self, step: int | None = None) -> tuple[ModelConfig, Any]:
        """The model config and parameters (host NumPy arrays) of the newest good checkpoint
        (or of `step`); a damaged checkpoint is reported and the previous one used."""
        model_cfg = self.model_config()
        abstract = jax.eval_shape(
            lambda: nn.meta.unbox(init_variables(model_cfg, jax.random.key(0)))
        )
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract["params"])
        checkpoints = self.checkpoints(read_only=True)
        try:
            if not checkpoints.all_steps():
                raise CheckpointError(
                    f"{self.path} has no checkpoint yet; train it first "
                    f"(train.py --workdir={self.path})"
                )
            used, params, damaged = checkpoints.newest_readable(
                lambda s: checkpoints.restore_params(s, target), None if step is None else [step]
            )
        finally:
            checkpoints.close()
        if damaged:
            log.warning(
                "loaded the checkpoint at step %d instead of the damaged step(s) %s",
                used,
                ", ".join(map(str, damaged)),
            )
        return model_cfg, params

    def model_config(self) -> ModelConfig:
        """The run's resolved model config. A run saved before `real_vocab_size` existed gets
        its tokenizer's size, which the run used for it."""
        values = self.read_config()["model"]
        if "real_vocab_size" not in values:
            values = {**values, "real_vocab_size": self.load_tokenizer().vocab_size}
        return ModelConfig.from_dict(values)

    def load(self, step: int | None = None) -> tuple[ModelConfig, Any, Tokenizer]:
        """(model config, params, tokenizer) from the newest good checkpoint (or `step`)."""
        model_cfg, params = self.load_params(step)
        return model_cfg, params, self.load_tokenizer()

    # ----------------------------------------------------------------------- starting a run
    @contextlib.contextmanager
    def removed_on_failure(self, enabled: bool = True) -> Iterator[None]:
        """Whatever the block creates in the directory is removed if it raises (and the
        directory itself, if the block created it): a failed start leaves it as it was."""
        existed = self.path.exists()
        before = set(os.listdir(self.path)) if existed else set()
        try:
            yield
        except BaseException:
            if enabled:
                if not existed:
                    shutil.rmtree(self.path, ignore_errors=True)
                elif self.path.is_dir():
                    for name in set(os.listdir(self.path)) - before:
                        target = self.path / name
                        if target.is_dir() and not target.is_symlink():
                            shutil.rmtree(target, ignore_errors=True)
                        else:
                            target.unlink(missing_ok=True)
            raise


def load_run(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, Any, Any]:
    """(model config, params, tokenizer) of a training run, from its newest good checkpoint."""
    return RunDir(workdir).load(step)


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, Any]:
    """(model config, host params) of a training run's newest good checkpoint (or `step`)."""
    return RunDir(workdir).load_params(step)
