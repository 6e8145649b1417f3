"""A whole training run: `train_and_evaluate(config, workdir)`, used by train.py, tests and
notebooks. It opens the run directory, builds the data and the `Trainer`, restores the newest
good checkpoint (or initialises, or starts from `checkpoint.init_from`), runs the loop with its
hooks and reports how it ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from tqdm import tqdm

from transformer import evaluation as lm_eval_tasks  # names load on first use: lm-eval optional
from transformer.data.pipeline import Data, make_data
from transformer.store.rundir import RunDir
from transformer.train.config import RunConfig
from transformer.train.faults import StopSignal
from transformer.train.finetune import initial_params
from transformer.train.hooks import (
    Hook,
    LogMetrics,
    MetricSums,
    NonFinitePolicy,
    SaveCheckpoint,
    Throughput,
)
from transformer.train.metrics import (
    MetricsWriter,
    count_params,
    flops_per_token,
    known_peak_flops,
)
from transformer.train.steps import TrainState
from transformer.train.trainer import Trainer


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last logged record (step, train_loss, val_loss, ...)
    state: TrainState
    trainer: Trainer
    data: Data
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
    rundir: RunDir
    trainer: Trainer
    data: Data
    checkpoints: Any
    state: TrainState | None  # None: the run had already finished
    step: int
    sums: dict[str, Any] | None  # metric sums pending at `step` (a resumed run)


def _start(run_cfg: RunConfig, rundir: Any) -> _Start:
    """Data, trainer and the state to continue from: the newest good checkpoint, or new
    parameters (fine-tuned from checkpoint.init_from if given)."""
    train_cfg = run_cfg.train
    if train_cfg.task_names:  # before any data is read: lm-eval installed, the tasks known
        lm_eval_tasks.check_tasks(train_cfg.task_names, train_cfg.eval_tasks_path or None)
    data = make_data(
        run_cfg.data,
        global_batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        tokenizer_path=rundir.tokenizer_path,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model_cfg = run_cfg.model_config(data.tokenizer.vocab_size)
    rundir.check_resumable(model_cfg, train_cfg.prng_impl)
    trainer = Trainer.build(run_cfg, model_cfg)
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
                state = state.replace(params=trainer.place_params(params, state.params))
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
    measures = [evaluation]
    if train_cfg.task_names:
        # lm-eval tasks at the evaluation steps: {"eval/<task>/<metric>": value}
        measures.append(
            Hook(
                lambda info: lm_eval_tasks.evaluate_tasks(
                    trainer.model_cfg,
                    info.state.params,
                    data.tokenizer,
                    train_cfg.task_names,
                    include_path=train_cfg.eval_tasks_path or None,
                    limit=train_cfg.eval_tasks_limit or None,
                    mesh=trainer.mesh,
                ),
                every=train_cfg.eval_every_steps,
                at_last=True,
            )
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
        measures=(*measures, end_of_run),
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
            f"{resumed}workdir {workdir}: {trainer.model_cfg.describe()}, {num_params:,} "
            f"parameters, mesh {dict(trainer.mesh.shape)}, {peak}",
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
