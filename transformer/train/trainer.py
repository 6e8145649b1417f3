"""The `Trainer`: a jitted step plus a loop plus hooks, for one run config and model.

`Trainer.build` compiles the pure steps of `transformer.train.steps` with explicit shardings over
the mesh, the state donated; parameters are created sharded (`jax.eval_shape` +
`jax.jit(out_shardings=...)`), never whole on one device. `Trainer.run` steps and calls the
hooks that are due (`transformer.train.hooks`: metric sums, records, checkpoints); it syncs with
the host only when a hook records or saves. A whole run is `transformer.train.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from transformer.model import lora, sharding
from transformer.model.config import ModelConfig
from transformer.train.config import RunConfig
from transformer.train.hooks import Hook, StepInfo, Throughput
from transformer.train.optim import optimizer_for
from transformer.train.steps import TrainState, eval_step, prng_key, train_step, wrap_key
from transformer.train.tasks import Task, task_for


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one run config and model: optimizer, mesh, shardings, steps."""

    run_cfg: RunConfig
    model_cfg: ModelConfig
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the checkpoint restore target
    init_state: Any  # jitted: raw key data of train.prng_impl -> sharded TrainState
    train_step: Any  # jitted: (state, batch) -> (state, metrics)
    eval_step: Any  # jitted: (params, batch) -> metrics

    @classmethod
    def build(
        cls,
        run_cfg: RunConfig,
        model_cfg: ModelConfig,
        *,
        devices: Sequence[jax.Device] | None = None,
    ) -> Trainer:
        """Mesh, optimizer and compiled steps for `model_cfg` (the run's model, vocabulary
        resolved) under `run_cfg`; checks that the model and batch fit the mesh."""
        train_cfg, mesh_cfg = run_cfg.train, run_cfg.mesh
        mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)
        sharding.check_model_fits(model_cfg, mesh)
        sharding.check_batch_fits(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
        task = task_for(model_cfg)
        tx, schedule = optimizer_for(train_cfg, model_cfg.d_model)

        impl = train_cfg.prng_impl

        def boxed_init(rng: jax.Array) -> TrainState:
            key = wrap_key(rng, impl)
            params = task.init(key)["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(lora.split_trainable(params)[0]),
                rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            )

        # The raw key data's shape and dtype are the generator's.
        key_data = jax.eval_shape(lambda: jax.random.key_data(prng_key(0, impl)))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            abstract_boxed = jax.eval_shape(boxed_init, key_data)
        state_sharding = sharding.logical_to_sharding(abstract_boxed, mesh)
        abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(abstract_boxed),
            state_sharding,
        )
        batches, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        step = functools.partial(
            train_step,
            task=task,
            tx=tx,
            label_smoothing=train_cfg.label_smoothing,
            accum_steps=train_cfg.grad_accum_steps,
            skip_nonfinite=train_cfg.nonfinite == "skip",
            prng_impl=impl,
        )
        evaluate = functools.partial(eval_step, task=task)
        return cls(
            run_cfg=run_cfg,
            model_cfg=model_cfg,
            task=task,
            tx=tx,
            schedule=schedule,
            mesh=mesh,
            state_sharding=state_sharding,
            abstract_state=abstract_state,
            init_state=jax.jit(
                lambda rng: nn.meta.unbox(boxed_init(rng)), out_shardings=state_sharding
            ),
            train_step=jax.jit(
                step,
                in_shardings=(state_sharding, batches),
                out_shardings=(state_sharding, replicated),
                donate_argnums=0,
            ),
            eval_step=jax.jit(
                evaluate,
                in_shardings=(state_sharding.params, batches),
                out_shardings=replicated,
            ),
        )

    @contextlib.contextmanager
    def within_mesh(self) -> Iterator[None]:
        """Context for running model code: the mesh and the logical axis rules."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            yield

    def new_state(self, seed: int) -> TrainState:
        key = prng_key(seed, self.run_cfg.train.prng_impl)
        return self.init_state(jax.random.key_data(key))

    def place_params(self, host_params: Any, params: Any) -> Any:
        """`params` with every parameter that `host_params` (e.g. to fine-tune from) holds
        replaced by it, sharded like this trainer's; the others (LoRA adapters a base model has
        no values for) stay as they are."""
        abstract = traverse_util.flatten_dict(self.abstract_state.params)
        host = traverse_util.flatten_dict(host_params)
        unknown = sorted("/".join(p) for p in set(host) - set(abstract))
        if unknown:
            raise ValueError(f"parameters {', '.join(unknown[:4])} are not this model's")
        placed = {
            path: jax.device_put(np.asarray(host[path], s.dtype), s.sharding)
            if path in host
            else value
            for (path, s), value in zip(
                abstract.items(), traverse_util.flatten_dict(params).values(), strict=True
            )
        }
        return traverse_util.unflatten_dict(placed)

    def evaluate(self, params: Any, batches: Any) -> dict[str, float]:
        """Held-out loss and perplexity over `batches` (this process's rows of each)."""
        totals = {"nll_sum": 0.0, "tokens": 0.0}
        with self.within_mesh():
            for local in batches:
                out = self.eval_step(params, sharding.global_batch(local, self.mesh))
                totals = {k: totals[k] + float(out[k]) for k in totals}
        if totals["tokens"] == 0:
            return {}
        loss = totals["nll_sum"] / totals["tokens"]
        return {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0)))}

    def run(
        self,
        state: TrainState,
        batches: Iterator[dict[str, np.ndarray]],
        *,
        start: int,
        hooks: Sequence[Hook],
        stop: Any,
        clock: Throughput,
    ) -> tuple[TrainState, int]:
        """Steps from `start` to train.stop_at_step (or num_steps) unless `stop` is requested,
        running the hooks that are due after each step; returns the state and the step."""
        train_cfg = self.run_cfg.train
        step = start
        with self.within_mesh():
            while step < train_cfg.last_step and not stop.requested:
                batch = sharding.global_batch(next(batches), self.mesh)
                state, metrics = self.train_step(state, batch)
                step += 1
                stop.check_preemption(step)  # multi-process: JAX's preemption sync point
                info = StepInfo(
                    step, state, metrics, train_cfg.num_steps, train_cfg.last_step, stop
                )
                started = time.perf_counter()
                for hook in hooks:
                    if hook.due(info):
                        hook.fn(info)
                clock.exclude_since(started)  # recording and saving are not training
        return state, step
