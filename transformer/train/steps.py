"""The pure step functions: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

They see the model only through a `Task` (`task.loss(params, batch, rng=...)` gives the loss
sums of a batch), so one step serves every model. Metrics are sums and token counts, so
means stay right under padding, gradient accumulation and several hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from transformer.model import lora
from transformer.train.config import PRNG_IMPLS
from transformer.train.tasks import Batch, Task


def prng_key(seed: int, impl: str) -> jax.Array:
    """A typed key of the generator `train.prng_impl` names."""
    return jax.random.key(seed, impl=PRNG_IMPLS[impl])


def wrap_key(key_data: jax.Array, impl: str) -> jax.Array:
    """The typed key of raw key data (`TrainState.rng`) of the generator `impl`."""
    return jax.random.wrap_key_data(key_data, impl=PRNG_IMPLS[impl])


class TrainState(struct.PyTreeNode):
    step: jax.Array  # optimizer steps taken
    params: Any
    opt_state: Any  # of the trainable parameters: all, or only the LoRA adapters
    # The run's key as raw key data, shaped by its generator (uint32 [2] threefry, [4] rbg;
    # `wrap_key` with train.prng_impl): checkpoints hold plain arrays. Per-step keys are
    # fold_in(key, step).
    rng: jax.Array


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    task: Task,
    tx: optax.GradientTransformation,
    label_smoothing: float,
    accum_steps: int,
    skip_nonfinite: bool,
    prng_impl: str,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `accum_steps` micro-batches; metrics are sums and counts."""
    rng = jax.random.fold_in(wrap_key(state.rng, prng_impl), state.step)
    # With LoRA adapters only they are differentiated and updated; the base stays as it is.
    trainable, frozen = lora.split_trainable(state.params)

    def micro_step(params: Any, micro: Batch, key: jax.Array) -> tuple[Any, jax.Array, ...]:
        def objective(p: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            loss, nll, count = task.loss(
                lora.join(p, frozen), micro, rng=key, label_smoothing=label_smoothing
            )
            return loss, (nll, count)

        (loss, (nll, count)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, loss, nll, count

    if accum_steps == 1:
        grads, loss, nll, count = micro_step(trainable, batch, rng)
    else:
        # Micro-batch j takes rows j, j + k, j + 2k, ...: every device holds a share of each.
        micro_batches = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(
                0, 1
            ),
            batch,
        )

        def body(
            carry: tuple[Any, ...], xs: tuple[Batch, jax.Array]
        ) -> tuple[tuple[Any, ...], None]:
            micro, index = xs
            out = micro_step(trainable, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = (jax.tree.map(jnp.zeros_like, trainable), 0.0, 0.0, 0.0)
        (grads, loss, nll, count), _ = jax.lax.scan(
            body, zeros, (micro_batches, jnp.arange(accum_steps))
        )

    with jax.named_scope("optimizer"):  # a region of its own in profiles (PROFILE_SCOPES)
        # Gradients of sums over tokens -> gradient of the mean over every token of the step.
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = lora.join(optax.apply_updates(trainable, updates), frozen)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old parameters and optimizer state, but count the step
        new_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            new_state,
            state.replace(step=state.step + 1),
        )
    metrics = {
        "loss_sum": loss,
        "nll_sum": nll,
        "tokens": count,
        "grad_norm": grad_norm,
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, task: Task) -> dict[str, jax.Array]:
    _, nll, count = task.loss(params, batch)
    return {"nll_sum": nll, "tokens": count}
