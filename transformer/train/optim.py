"""Optax optimiser and learning-rate schedules (the loss is `transformer.model.ops.loss`).

Schedules:
  cosine        linear warmup to `learning_rate`, cosine decay to `min_learning_rate` (GPT)
  inverse_sqrt  lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (paper eq. 3), times
                `learning_rate` as a factor (1.0 = the paper)
  constant      linear warmup, then constant
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from transformer.errors import ConfigError
from transformer.train.config import SCHEDULES, TrainConfig


def make_schedule(
    name: str,
    *,
    learning_rate: float,
    warmup_steps: int,
    num_steps: int,
    min_learning_rate: float = 0.0,
    d_model: int = 512,
) -> optax.Schedule:
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=max(warmup_steps, 0),
            decay_steps=max(num_steps, warmup_steps + 1),
            end_value=min_learning_rate,
        )
    if name == "inverse_sqrt":
        warmup = max(warmup_steps, 1)

        def inverse_sqrt(count: jax.Array) -> jax.Array:
            step = jnp.asarray(count, jnp.float32) + 1.0  # the paper counts steps from 1
            return learning_rate * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5)

        return inverse_sqrt
    if name == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                optax.constant_schedule(learning_rate),
            ],
            [warmup_steps],
        )
    raise ConfigError(f"train.schedule={name!r}: must be one of {', '.join(SCHEDULES)}")


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (kernels and LoRA adapters): not on biases, norm scales
    or embeddings."""

    def decays(path: tuple[Any, ...], leaf: jax.Array) -> bool:
        return getattr(path[-1], "key", None) in ("kernel", "lora_a", "lora_b")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """AdamW with masked decay, after global-norm clipping (0 disables clipping)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw


def optimizer_for(train_cfg: TrainConfig, d_model: int) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, learning-rate schedule) from the run config's `train` section."""
    schedule = make_schedule(
        train_cfg.schedule,
        learning_rate=train_cfg.learning_rate,
        warmup_steps=train_cfg.warmup_steps,
        num_steps=train_cfg.num_steps,
        min_learning_rate=train_cfg.min_learning_rate,
        d_model=d_model,
    )
    tx = make_optimizer(
        schedule,
        b1=train_cfg.b1,
        b2=train_cfg.b2,
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        grad_clip=train_cfg.grad_clip,
    )
    return tx, schedule
