"""Tasks: what a model is trained to do, the one seam between a model and the trainer.

A task owns its batch layout (the keys and shapes `transformer.data.pipeline` produces), the
model call
that turns a batch into `(logits, targets, weights)`, and what is shown and measured at the end
of a run. The trainer, the loss and the steps never ask which model they have; `task_for` is the
one place that does.

  LanguageModelTask  GPT: batch `tokens` [b, t + 1] (and `mask` [b, t] when evaluating, and
                     for examples with answers also `segment_ids` and `positions`);
                     predict token i + 1 from tokens <= i. At the end: a sample of text.
  TranslationTask    encoder-decoder: batch `src`, `tgt_in`, `tgt_out`, segment ids and
                     positions, all [b, t]. At the end: BLEU of held-out pairs and examples.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.data.pairs import TRANSLATION_KEYS
from transformer.inference import bleu, generate, translate
from transformer.model import ops
from transformer.model.config import ModelConfig
from transformer.model.models import GPT, EncoderDecoder, init_variables

Batch = dict[str, jax.Array]


class Task:
    """The interface; see the module docstring."""

    def __init__(self, model_cfg: ModelConfig):
        self.model_cfg = model_cfg
        self.model = self.build_model(model_cfg)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (for initialisation and shape inference)."""
        raise NotImplementedError

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """The model's variables (parameters boxed with their logical axes)."""
        raise NotImplementedError

    def forward(
        self, params: Any, batch: Batch, *, rng: jax.Array | None = None, hidden: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits [b, t, v], targets [b, t], weights [b, t]); dropout on when `rng` is given.
        With `hidden`, the last hidden states [b, t, d] in place of the logits."""
        raise NotImplementedError

    def loss(
        self,
        params: Any,
        batch: Batch,
        *,
        rng: jax.Array | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(smoothed loss sum, nll sum, token count) of a batch, over the model's real classes
        (`model.num_classes`). The logits are in the compute dtype and the loss makes no
        float32 copy of them (`ops.cross_entropy`); with model.loss_chunk_len the output
        projection and the loss run a chunk of positions at a time (`ops.chunked_cross_entropy`),
        so the full [b, t, v] logits never exist."""
        cfg = self.model_cfg
        smoothing = dict(label_smoothing=label_smoothing, num_classes=cfg.num_classes)
        hidden, targets, weights = self.forward(params, batch, rng=rng, hidden=True)
        # The reference formula (model.loss_impl) takes float32 logits, as the loss once did.
        fused = cfg.loss_impl == "fused"
        dtype = cfg.compute_dtype if fused else jnp.float32
        loss = ops.cross_entropy if fused else ops.cross_entropy_reference

        def project(params: Any, h: jax.Array) -> jax.Array:
            with jax.named_scope("logits"):
                return self.model.apply({"params": params}, h, dtype, method="logits")

        if not cfg.loss_chunk_len:
            logits = project(params, hidden)
            with jax.named_scope("loss"):
                return loss(logits, targets, weights, **smoothing)
        return ops.chunked_cross_entropy(
            project,
            params,
            hidden,
            targets,
            weights,
            chunk_len=cfg.loss_chunk_len,
            loss=loss,
            **smoothing,
        )

    def end_of_run_metrics(
        self, params: Any, tokenizer: Any, data: Any, train_cfg: Any
    ) -> dict[str, float]:
        """Measured once at the last step and logged with it (BLEU for translation)."""
        return {}

    def final_report(self, params: Any, tokenizer: Any, data: Any, train_cfg: Any) -> str:
        """Shown after training: a sample of text, or example translations ('' = nothing)."""
        return ""


def _dropout(rng: jax.Array | None) -> dict[str, Any]:
    return {"deterministic": rng is None, "rngs": None if rng is None else {"dropout": rng}}


class LanguageModelTask(Task):
    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return GPT(cfg)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        return {"tokens": np.zeros((batch_size, seq_len + 1), np.int32)}

    def init(self, rng: jax.Array) -> dict[str, Any]:
        return init_variables(self.model_cfg, rng)

    def forward(self, params, batch, *, rng=None, hidden=False):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        # Examples packed in rows (chat, instruct) attend within their segment, positions
        # restarting with each (`transformer.data.examples`).
        packed = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
        logits = self.model.apply(
            {"params": params}, inputs, return_hidden=hidden, **packed, **_dropout(rng)
        )
        # Loss weights: evaluation batches mark the rows that pad out the last batch with mask
        # 0; example batches mark the answer tokens.
        weights = batch["mask"] if "mask" in batch else jnp.ones(targets.shape)
        return logits, targets, weights.astype(jnp.float32)

    def final_report(self, params, tokenizer, data, train_cfg) -> str:
        if train_cfg.sample_tokens <= 0:
            return ""
        text = generate(
            self.model_cfg,
            params,
            tokenizer,
            [""],
            max_new_tokens=train_cfg.sample_tokens,
            temperature=0.8,
            seed=train_cfg.seed,
        )[0]
        return f"--- sample ({train_cfg.sample_tokens} tokens, temperature 0.8) ---\n{text}\n---"


class TranslationTask(Task):
    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return EncoderDecoder(cfg)

    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((batch_size, seq_len), np.int32) for k in TRANSLATION_KEYS}

    def init(self, rng: jax.Array) -> dict[str, Any]:
        return init_variables(self.model_cfg, rng)

    def forward(self, params, batch, *, rng=None, hidden=False):
        logits = self.model.apply(
            {"params": params},
            batch["src"],
            batch["tgt_in"],
            src_segment_ids=batch["src_segment_ids"],
            tgt_segment_ids=batch["tgt_segment_ids"],
            src_positions=batch["src_positions"],
            tgt_positions=batch["tgt_positions"],
            return_hidden=hidden,
            **_dropout(rng),
        )
        return logits, batch["tgt_out"], (batch["tgt_segment_ids"] > 0).astype(jnp.float32)

    def end_of_run_metrics(self, params, tokenizer, data, train_cfg) -> dict[str, float]:
        if not (data.eval_pairs and train_cfg.bleu_pairs):
            return {}
        pairs = data.eval_pairs[: train_cfg.bleu_pairs]
        score, _ = bleu(
            self.model_cfg,
            params,
            tokenizer,
            pairs,
            beam_size=train_cfg.beam_size,
            alpha=train_cfg.beam_alpha,
        )
        return {"bleu": score}

    def final_report(self, params, tokenizer, data, train_cfg) -> str:
        pairs = (data.eval_pairs or [])[:3]
        if not pairs:
            return ""
        outputs = translate(self.model_cfg, params, tokenizer, [src for src, _ in pairs])
        return "\n\n".join(
            f"source:    {src}\nreference: {tgt}\nmodel:     {out}"
            for (src, tgt), out in zip(pairs, outputs, strict=True)
        )


def task_for(model_cfg: ModelConfig) -> Task:
    """The task a model config is for: a GPT models language, an encoder-decoder translates."""
    if model_cfg.is_decoder_only:
        return LanguageModelTask(model_cfg)
    return TranslationTask(model_cfg)
