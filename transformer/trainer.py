"""Training: `train_and_evaluate(config, workdir)`, used by train.py, tests and notebooks.

A `Trainer` is a jitted step plus a loop plus hooks. `Trainer.build` compiles the pure steps of
`transformer.steps` with explicit shardings over the mesh, the state donated; parameters are
created sharded (`jax.eval_shape` + `jax.jit(out_shardings=...)`), never whole on one device.
`Trainer.run` steps and calls the hooks that are due (`transformer.hooks`: metric sums,
records, checkpoints); it syncs with the host only when a hook records or saves.
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

from transformer import sharding
from transformer.config import ModelConfig
from transformer.hooks import (
    Hook,
    LogMetrics,
    MetricSums,
    NonFinitePolicy,
    SaveCheckpoint,
    StepInfo,
    Throughput,
)
from transformer.optim import optimizer_for
from transformer.run_config import RunConfig
from transformer.steps import TrainState, eval_step, train_step
from transformer.tasks import Task, task_for


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
    init_state: Any  # jitted: raw uint32 key -> sharded TrainState
    train_step: Any  # jitted: (state, batch) -> (state, metrics)
    eval_step: Any  # jitted: (params, batch) -> metrics

    @classmethod
    def build(
        cls,
        config: RunConfig | Any,
        model_cfg: ModelConfig,
        *,
        num_classes: int,
        devices: Sequence[jax.Device] | None = None,
    ) -> Trainer:
        run_cfg = RunConfig.from_any(config)
        train_cfg, mesh_cfg = run_cfg.train, run_cfg.mesh
        mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)
        sharding.check_model_fits(model_cfg, mesh)
        sharding.check_batch_fits(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
        task = task_for(model_cfg)
        tx, schedule = optimizer_for(train_cfg, model_cfg.d_model)

        def boxed_init(rng: jax.Array) -> TrainState:
            params = task.init(jax.random.wrap_key_data(rng))["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(params),
                rng=jax.random.fold_in(rng, 1),
            )

        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            abstract_boxed = jax.eval_shape(boxed_init, jax.ShapeDtypeStruct((2,), jnp.uint32))
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
            num_classes=num_classes,
            accum_steps=train_cfg.grad_accum_steps,
            skip_nonfinite=train_cfg.nonfinite == "skip",
        )
        evaluate = functools.partial(eval_step, task=task, num_classes=num_classes)
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
        return self.init_state(jax.random.key_data(jax.random.key(seed)))

    def place_params(self, host_params: Any) -> Any:
        """Host parameters (e.g. to fine-tune from) sharded like this trainer's."""
        return jax.tree.map(
            lambda x, s: jax.device_put(np.asarray(x, s.dtype), s.sharding),
            host_params,
            self.abstract_state.params,
        )

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


# ---------------------------------------------------------------------------------------------
# A whole run.


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last logged record (step, train_loss, val_loss, ...)
    state: TrainState
    trainer: Trainer
    data: Any  # transformer.data.Data
    stopped_early: bool  # a signal or train.stop_at_step ended the run before num_steps
    finished_before: bool = False  # the workdir's run had already reached num_steps

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer

    @property
    def eval_pairs(self) -> list[tuple[str, str]] | None:
        return self.data.eval_pairs

    def final_report(self) -> str:
        """What the task shows after training: a sample of text, or example translations."""
        params = jax.device_get(self.state.params)
        train_cfg = self.trainer.run_cfg.train
        return self.trainer.task.final_report(params, self.tokenizer, self.data, train_cfg)


@dataclasses.dataclass
class _Start:
    rundir: Any
    trainer: Trainer
    data: Any
    checkpoints: Any
    state: TrainState | None  # None: the run had already finished
    step: int
    sums: dict[str, Any] | None  # metric sums pending at `step` (a resumed run)


def _start(run_cfg: RunConfig, rundir: Any) -> _Start:
    """Data, trainer and the state to continue from: the newest good checkpoint, or new
    parameters (fine-tuned from checkpoint.init_from if given)."""
    from transformer.data import make_data
    from transformer.finetune import RUNTIME_MODEL_FIELDS, initial_params

    train_cfg = run_cfg.train
    data = make_data(
        run_cfg.data,
        global_batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        workdir=str(rundir.path),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model_cfg = run_cfg.model_config(data.tokenizer.vocab_size)
    rundir.check_same_model(model_cfg, RUNTIME_MODEL_FIELDS)
    trainer = Trainer.build(run_cfg, model_cfg, num_classes=data.tokenizer.vocab_size)
    trainer.task.check_data(data.corpus_kind, run_cfg.data.corpus)
    checkpoints = rundir.checkpoints(keep=run_cfg.checkpoint.keep)
    with trainer.within_mesh():
        restored = checkpoints.restore_latest_good(trainer.abstract_state, data.train_iter)
        if restored is not None:
            step, state = restored
            if step >= train_cfg.num_steps:
                return _Start(rundir, trainer, data, checkpoints, None, step, None)
            sums = checkpoints.read_metrics(step)
        else:
            step, state, sums = 0, trainer.new_state(train_cfg.seed), None
            if run_cfg.checkpoint.init_from:
                params = initial_params(run_cfg.checkpoint.init_from, model_cfg)
                state = state.replace(params=trainer.place_params(params))
    if jax.process_index() == 0:
        resolved = run_cfg.to_dict()
        resolved["model"] = model_cfg.to_dict()
        rundir.write_config(resolved)
    return _Start(rundir, trainer, data, checkpoints, state, step, sums)


def _mfu_scale(trainer: Trainer, num_params: int) -> tuple[float | None, str]:
    """(MFU per token/s, where the peak came from): train.peak_flops, else a known
    accelerator's published bf16 peak. None on other devices (CPUs): a matmul timed at start-up
    on a busy machine gave MFUs over 100%, so no MFU is shown there unless train.peak_flops
    gives the machine's limit."""
    from transformer.metrics import flops_per_token, known_peak_flops

    run_cfg = trainer.run_cfg
    device = jax.local_devices()[0]
    if run_cfg.train.peak_flops:
        peak, source = run_cfg.train.peak_flops, "train.peak_flops"
    elif (peak := known_peak_flops(device)) is not None:
        source = f"published bf16 peak of {device.device_kind}"
    else:
        return None, "no MFU: set train.peak_flops to this machine's FLOP/s to see it"
    # Simulated CPU devices share the same cores: the peak is the machine's.
    devices = 1 if device.platform == "cpu" else jax.device_count()
    flops = flops_per_token(trainer.model_cfg, num_params, run_cfg.data.seq_len)
    return flops / (peak * devices), f"peak {peak / 1e9:.1f} GFLOP/s ({source})"


def _hooks(start: _Start, stop: Any, clock: Throughput, mfu_scale: float | None) -> Any:
    """The run's hooks, in the order they run after a step, and its record keeper."""
    from tqdm import tqdm

    from transformer.metrics import MetricsWriter

    trainer, data, checkpoints = start.trainer, start.data, start.checkpoints
    run_cfg, train_cfg = trainer.run_cfg, trainer.run_cfg.train
    is_main = jax.process_index() == 0
    sums = MetricSums(trainer.mesh, start.sums)
    policy = NonFinitePolicy(train_cfg.nonfinite, checkpoints.latest_step)
    evaluation = Hook(
        lambda info: trainer.evaluate(
            info.state.params, data.eval_batches(train_cfg.eval_batches or None)
        ),
        every=train_cfg.eval_every_steps,
        at_last=True,
    )
    end_of_run = Hook(
        lambda info: trainer.task.end_of_run_metrics(
            jax.device_get(info.state.params), data.tokenizer, data, train_cfg
        ),
        at_last=True,
    )
    bar = tqdm(
        total=train_cfg.num_steps, initial=start.step, disable=not is_main, dynamic_ncols=True
    )
    log = LogMetrics(
        sums,
        policy,
        MetricsWriter(str(start.rundir.path), enabled=is_main),
        clock,
        trainer.schedule,
        mfu_scale,
        measures=(evaluation, end_of_run),
        bar=bar,
        on_record=stop.sync if jax.process_count() > 1 else lambda: None,
    )
    save = SaveCheckpoint(checkpoints, sums, policy, data.train_iter, run_cfg.to_dict())
    hooks = [
        Hook(sums.add, every=1),
        Hook(lambda info: bar.update(info.step - bar.n), every=1),
        Hook(log, every=train_cfg.log_every_steps, at_last=True, also_with=(evaluation,)),
        Hook(save, every=run_cfg.checkpoint.every_steps, at_last=True, at_stop=True),
    ]
    return hooks, log


def train_and_evaluate(config: RunConfig | Any, workdir: str) -> TrainResult:
    """Trains (or resumes) the run in `workdir` up to `config.train.num_steps`.

    `config` is a RunConfig or a ConfigDict / dict of one (checked field by field first). A
    start that fails (a bad corpus, a mesh that does not fit) leaves the workdir as it was.
    """
    from transformer.metrics import count_params
    from transformer.reliability import StopSignal
    from transformer.rundir import RunDir

    run_cfg = RunConfig.from_any(config)
    train_cfg, is_main = run_cfg.train, jax.process_index() == 0
    rundir = RunDir(workdir)
    with rundir.removed_on_failure(enabled=is_main):
        start = _start(run_cfg, rundir)
    trainer, data, checkpoints = start.trainer, start.data, start.checkpoints
    if start.state is None:
        checkpoints.close()
        if is_main:
            print(
                f"the run in {workdir} already finished at step {start.step} (train.num_steps="
                f"{train_cfg.num_steps}); raise --config.train.num_steps to continue training it",
                flush=True,
            )
        return TrainResult({}, None, trainer, data, stopped_early=False, finished_before=True)
    state, step = start.state, start.step
    num_params = count_params(state.params)
    mfu_scale, peak = _mfu_scale(trainer, num_params)
    if is_main:
        rundir.truncate_metrics(step)  # drop records a killed run logged past its checkpoint
        resumed = f"resuming from the checkpoint at step {step}\n" if step else ""
        print(
            f"{resumed}workdir {workdir}: {trainer.task.describe()}, {num_params:,} parameters, "
            f"mesh {dict(trainer.mesh.shape)}, {peak}",
            flush=True,
        )
    stop, clock = StopSignal(), Throughput(step)
    hooks, log = _hooks(start, stop, clock, mfu_scale)
    try:
        with stop:
            state, step = trainer.run(
                state, data.train_iter, start=step, hooks=hooks, stop=stop, clock=clock
            )
            checkpoints.wait()
    finally:
        log.bar.close()
        log.writer.close()
        checkpoints.close()
    if is_main:
        print(_ending(stop, step, train_cfg.num_steps, log.last), flush=True)
    return TrainResult(log.last, state, trainer, data, stopped_early=step < train_cfg.num_steps)


def _ending(stop: Any, step: int, num_steps: int, last: dict[str, Any]) -> str:
    if stop.requested:
        return (
            f"stopped by {stop.signal_name} at step {step}; checkpoint saved, run the same "
            "command to resume"
        )
    if step < num_steps:
        return (
            f"stopped at train.stop_at_step={step} with a checkpoint; run again with "
            "stop_at_step=0 to continue"
        )
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in last.items() if k in ("train_loss", "val_loss", "bleu")
    )
    return f"done: step {step}" + (f", {shown}" if shown else "")
