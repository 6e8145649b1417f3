"""The lm-evaluation-harness model backend: `TransformerLM`, registered with lm-eval as
`transformer` when this module is imported.

    from transformer.evaluation.harness import TransformerLM
    import lm_eval
    lm = TransformerLM(workdir="runs/default")           # or hf_dir="out/", or model=(cfg, params,
    lm_eval.simple_evaluate(model=lm, tasks=["..."])   #  tokenizer) for a model in memory
    lm_eval.simple_evaluate(model="transformer", model_args="workdir=runs/default", tasks=[...])

Model arguments (`--model_args` of `python -m transformer.evaluate`, or keywords):
  workdir=DIR      a training run: its newest good checkpoint (or `step=N`), its tokenizer and
                   its `mesh` section
  hf_dir=DIR       a Hugging Face GPT-2 or Llama directory (`transformer.hf.load_hf`) with a
                   `tokenizer.json` (`python -m transformer.export` writes one)
  dtype=NAME       compute dtype (float32, bfloat16, float16; default: the config's model.dtype)
  batch_size=N     rows per forward pass (default 32), rounded up to the data-parallel size
  data=, fsdp=, tensor=   mesh sizes (default: the run's mesh; data=-1 takes all devices)
  max_gen_toks=N   new tokens when a task does not say (default 256)
  prefix_token_id=ID   what an empty context and rolling windows start from (default: BOS, as
                   the `hf` backend on an exported directory; training puts EOS before documents)
  seed=N           sampling seed of generation tasks with do_sample

Tokenisation and scoring follow lm-eval's `hf` backend (HFLM) for a causal model that adds no
BOS: contexts and continuations split as `TemplateLM._encode_pair` does, left truncation to the
context, rolling windows from `lm_eval.utils.get_rolling_token_windows`, stop sequences cut as
`lm_eval.models.utils.postprocess_generated_text` does. One difference: special-token strings in
a task's text (e.g. a literal "<eos>") stay text here (`transformer.data.tokenizer`), while the
`hf` backend's tokenizer turns them into the special ids.

lm-eval discovers no models outside itself: `lm_eval --model transformer` works only in a
process that imported this module (Python, `python -c`); the command is
`python -m transformer.evaluate` (`transformer.cli.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from transformer.data.tokenizer import TOKENIZER, Tokenizer
from transformer.errors import ConfigError, require
from transformer.evaluation.scoring import Scorer
from transformer.hf import load_hf
from transformer.model.config import DTYPES, ModelConfig
from transformer.model.sharding import make_mesh
from transformer.store.rundir import RunDir

_PURPOSE = "evaluation with lm-evaluation-harness"
lm_api = require("lm_eval.api.model", "eval", _PURPOSE)
lm_registry = require("lm_eval.api.registry", "eval", _PURPOSE)
lm_utils = require("lm_eval.utils", "eval", _PURPOSE)
model_utils = require("lm_eval.models.utils", "eval", _PURPOSE)
# lm-eval registers its own models only while its registry is empty: let it do so before ours.
require("lm_eval.models", "eval", _PURPOSE)

log = logging.getLogger(__name__)

MODEL_NAME = "transformer"  # `--model transformer`
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256


@dataclasses.dataclass
class Source:
    """A model to evaluate: config, parameters, tokenizer, mesh sizes and the prefix token."""

    cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer
    mesh: dict[str, int]
    prefix_token_id: int
    name: str


def check_source(workdir: str | None, hf_dir: str | None) -> None:
    """Raises the error a user can fix (one of workdir/hf_dir, a directory that is a run or a
    Hugging Face model with a tokenizer) before anything is loaded."""
    if (workdir is None) == (hf_dir is None):
        raise ConfigError(
            "name the model to evaluate with exactly one of workdir=DIR and hf_dir=DIR "
            "(--workdir, --hf_dir on the command line)"
        )
    if workdir is not None:
        RunDir(workdir).read_config()
        return
    path = Path(hf_dir)
    for name in ("config.json", TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing: hf_dir must be a Hugging Face GPT-2 or Llama "
                "directory with its tokenizer.json (python -m transformer.export writes one)"
            )


def load_source(workdir: str | None, hf_dir: str | None, step: int | None = None) -> Source:
    """The model of a training run (`workdir`) or of a Hugging Face directory (`hf_dir`)."""
    check_source(workdir, hf_dir)
    if workdir is not None:
        run = RunDir(workdir)
        cfg, params, tokenizer = run.load(step)
        mesh = dict(run.read_config().get("mesh", {}))
        return Source(cfg, params, tokenizer, mesh, tokenizer.bos_id, str(workdir))
    cfg, params = load_hf(hf_dir)
    tokenizer = Tokenizer.load(Path(hf_dir) / TOKENIZER)
    return Source(cfg, params, tokenizer, {}, hf_prefix_token(hf_dir, tokenizer), str(hf_dir))


def hf_prefix_token(hf_dir: str | os.PathLike, tokenizer: Tokenizer) -> int:
    """The `hf` backend's prefix token for a directory: its tokenizer_config.json's BOS, else its
    EOS (our tokenizer's BOS without that file)."""
    path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token and tokenizer.hf.token_to_id(token) is not None:
            return tokenizer.hf.token_to_id(token)
    return tokenizer.bos_id


def _dtype(name: str | None, cfg: ModelConfig) -> ModelConfig:
    if name in (None, "", "auto"):
        return cfg
    name = DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r}: choose one of {', '.join(DTYPES)}")
    return dataclasses.replace(cfg, dtype=name)


def _batch_size(value: Any) -> int:
    """lm-eval passes its --batch_size (default 1) through; 'auto' takes ours."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"batch_size={value!r} must be a whole number or 'auto'") from None


def _mesh(saved: dict[str, int], given: dict[str, int | None]) -> Mesh:
    """The mesh of the sizes `given`, else of the run's `saved` mesh section, else all devices
    on the data axis. A saved mesh this machine's devices do not fit (a run trained elsewhere)
    gives way to the default, with a warning."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    explicit = {k: int(v) for k, v in given.items() if v is not None}
    if explicit:
        return make_mesh(**{**sizes, **explicit})
    try:
        return make_mesh(**{**sizes, **{k: int(saved[k]) for k in sizes if k in saved}})
    except ConfigError as e:
        log.warning("the run's mesh does not fit here (%s); evaluating with data=-1", e)
        return make_mesh(**sizes)


@lm_registry.register_model(MODEL_NAME)
class TransformerLM(lm_api.TemplateLM):
    """An lm-eval `LM` over this library's GPT: batched log-likelihoods and generation on a
    device mesh (see the module docstring for its arguments)."""

    def __init__(
        self,
        workdir: str | None = None,
        hf_dir: str | None = None,
        *,
        model: tuple[ModelConfig, Any, Tokenizer] | None = None,
        mesh: Mesh | None = None,
        step: int | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        prefix_token_id: int | None = None,
        seed: int = 0,
        data: int | None = None,
        fsdp: int | None = None,
        tensor: int | None = None,
        max_batch_size: int | None = None,  # lm-eval's, for batch_size=auto: unused
        device: str | None = None,  # lm-eval's: JAX places the model on the mesh instead
    ):
        super().__init__()
        if model is not None:
            if workdir is not None or hf_dir is not None:
                raise ConfigError("pass either model=(cfg, params, tokenizer) or a directory")
            cfg, params, tokenizer = model
            source = Source(cfg, params, tokenizer, {}, tokenizer.bos_id, "in memory")
        else:
            source = load_source(workdir, hf_dir, step)
        if mesh is None:
            mesh = _mesh(source.mesh, {"data": data, "fsdp": fsdp, "tensor": tensor})
        self.tokenizer = source.tokenizer
        self.source = source.name
        self.scorer = Scorer(
            _dtype(dtype, source.cfg), source.params, mesh, _batch_size(batch_size)
        )
        self._prefix_token_id = (
            int(prefix_token_id) if prefix_token_id is not None else source.prefix_token_id
        )
        self._max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    @classmethod
    def from_model(
        cls, cfg: ModelConfig, params: Any, tokenizer: Tokenizer, **options: Any
    ) -> TransformerLM:
        """The backend over a model in memory (a training run's parameters, on its mesh)."""
        return cls(model=(cfg, params, tokenizer), **options)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def cfg(self) -> ModelConfig:
        return self.scorer.cfg

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def get_model_info(self) -> dict[str, Any]:
        leaves = jax.tree.leaves(self.scorer.params)
        return {
            "model_source": self.source,
            "model_num_parameters": int(sum(x.size for x in leaves)),
            "model_dtype": self.cfg.dtype,
        }

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of `string`; no special tokens are ever added (as the `hf` backend on an
        exported directory, whose tokenizer adds none)."""
        ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ the three requests
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """`(request, context ids, continuation ids)` -> `(log p, is greedy)`; `TemplateLM`
        tokenises `loglikelihood` requests into these."""
        results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
        for (request, _, _), answer in zip(requests, results, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of the model's context, each
        conditioned on as much preceding text as fits (the first on the prefix token)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for pair in map(lm_utils.make_disjoint_window, pairs):
                windows.append(pair)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self.scorer.loglikelihoods(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continues each context (greedy unless the task samples) for up to `max_gen_toks`
        tokens or an EOS, and cuts the text at the first of the task's `until` strings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            outputs = self._generate(contexts, requests[indices[0]].args[1])
            for i, text in zip(indices, outputs, strict=True):
                texts[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return texts

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = dict(model_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        until = model_utils.handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tokenizer.eos_token
        )
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)  # greedy sets it to 0
        start = [self.tokenizer.eos_id]  # an empty context starts a new document
        ids = self.scorer.generate(
            [self.tok_encode(c) or start for c in contexts],
            max_new_tokens=int(kwargs.pop("max_gen_toks")),
            eos_id=self.tokenizer.eos_id,
            temperature=temperature if sample else 0.0,
            top_k=int(kwargs.pop("top_k", 0) or 0),
            top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
            seed=self.seed,
        )
        if kwargs:
            log.warning("generation ignores these settings: %s", ", ".join(sorted(kwargs)))
        return [
            model_utils.postprocess_generated_text(self.tokenizer.decode(row), until, None)
            for row in ids
        ]
