"""The training loop: `train_and_evaluate(config, workdir)`, used by train.py, tests and notebooks.

The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted with explicit
shardings over the mesh and the state donated. Parameters are created sharded (`jax.eval_shape`
+ `jax.jit(out_shardings=...)`), never whole on one device. The loop syncs with the host only
when it logs, evaluates or saves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from transformer import sharding as shd
from transformer.checkpoint import Checkpoints
from transformer.config import ConfigError, ModelConfig
from transformer.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from transformer.models import GPT, EncoderDecoder
from transformer.optim import cross_entropy, make_optimizer, make_schedule

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    step: jax.Array  # optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step)


def build_model(cfg: ModelConfig) -> nn.Module:
    return GPT(cfg) if cfg.is_decoder_only else EncoderDecoder(cfg)


# ---------------------------------------------------------------------------------------------
# Batches -> model inputs.


def dummy_batch(cfg: ModelConfig, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch of the right shapes and dtypes (for initialisation and shape inference)."""
    if cfg.is_decoder_only:
        return {"tokens": np.zeros((batch_size, seq_len + 1), np.int32)}
    shape = (batch_size, seq_len)
    return {
        k: np.zeros(shape, np.int32)
        for k in (
            "src",
            "tgt_in",
            "tgt_out",
            "src_segment_ids",
            "tgt_segment_ids",
            "src_positions",
            "tgt_positions",
        )
    }


def forward(
    model: nn.Module,
    params: Any,
    batch: Batch,
    *,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [b, t, v], targets [b, t], weights [b, t]) for either model's batch."""
    train = rng is not None
    rngs = {"dropout": rng} if train else None
    if "tokens" in batch:  # language model: predict token i+1 from tokens <= i
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = model.apply({"params": params}, inputs, deterministic=not train, rngs=rngs)
        # Evaluation batches mark the rows that pad out the last batch with mask 0.
        weights = batch["mask"] if "mask" in batch else jnp.ones(targets.shape)
        return logits, targets, weights.astype(jnp.float32)
    logits = model.apply(
        {"params": params},
        batch["src"],
        batch["tgt_in"],
        src_segment_ids=batch["src_segment_ids"],
        tgt_segment_ids=batch["tgt_segment_ids"],
        src_positions=batch["src_positions"],
        tgt_positions=batch["tgt_positions"],
        deterministic=not train,
        rngs=rngs,
    )
    return logits, batch["tgt_out"], (batch["tgt_segment_ids"] > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Steps.


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    label_smoothing: float,
    num_classes: int,
    accum_steps: int,
    skip_nonfinite: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `accum_steps` micro-batches; metrics are sums and counts."""
    rng = jax.random.fold_in(state.rng, state.step)

    def micro_step(params: Any, micro: Batch, key: jax.Array) -> tuple[Any, jax.Array, ...]:
        def objective(p: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            logits, targets, weights = forward(model, p, micro, rng=key)
            loss, nll, count = cross_entropy(
                logits, targets, weights, label_smoothing=label_smoothing, num_classes=num_classes
            )
            return loss, (nll, count)

        (loss, (nll, count)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, loss, nll, count

    if accum_steps == 1:
        grads, loss, nll, count = micro_step(state.params, batch, rng)
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
            out = micro_step(state.params, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), 0.0, 0.0, 0.0)
        (grads, loss, nll, count), _ = jax.lax.scan(
            body, zeros, (micro_batches, jnp.arange(accum_steps))
        )

    # Gradients of sums over tokens -> gradient of the mean over every token of the step.
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
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


def eval_step(
    params: Any,
    batch: Batch,
    *,
    model: nn.Module,
    num_classes: int,
) -> dict[str, jax.Array]:
    logits, targets, weights = forward(model, params, batch)
    _, nll, count = cross_entropy(logits, targets, weights, num_classes=num_classes)
    return {"nll_sum": nll, "tokens": count}


# ---------------------------------------------------------------------------------------------
# Set-up: config, model, sharded state.


def resolve_model_config(config: Any, vocab_size: int) -> ModelConfig:
    """ModelConfig from `config.model`, with vocab_size 0 = the tokenizer's padded size."""
    values = config.model.to_dict()
    if values.get("vocab_size", 0) == 0:
        multiple = max(int(config.data.pad_vocab_to_multiple_of), 1)
        values["vocab_size"] = -(-vocab_size // multiple) * multiple
    elif values["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
            f"{vocab_size} tokens; set model.vocab_size=0 to size it from the tokenizer"
        )
    return ModelConfig.from_dict(values)


@dataclasses.dataclass
class Setup:
    """Everything derived from a config once: the model, optimizer, mesh, shardings, steps."""

    model_cfg: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    abstract_state: Any
    init_state: Any  # jitted: rng -> sharded TrainState
    train_step: Any  # jitted: (state, batch) -> (state, metrics)
    eval_step: Any  # jitted: (params, batch) -> metrics


def make_setup(
    config: Any, model_cfg: ModelConfig, num_classes: int, devices: list[jax.Device] | None = None
) -> Setup:
    t = config.train
    if config.data.seq_len > model_cfg.max_len:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than model.max_len="
            f"{model_cfg.max_len}, the longest sequence the model takes; lower data.seq_len or "
            "raise model.max_len"
        )
    if t.batch_size % max(t.grad_accum_steps, 1):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by "
            f"train.grad_accum_steps={t.grad_accum_steps}; make it a multiple"
        )
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    shd.check_model_fits(model_cfg, mesh)
    micro = t.batch_size // max(t.grad_accum_steps, 1)
    if micro % shd.data_parallel_size(mesh):
        raise ConfigError(
            f"the micro-batch of {micro} sequences does not split over mesh data x fsdp = "
            f"{shd.data_parallel_size(mesh)} devices; make train.batch_size a multiple of "
            f"{shd.data_parallel_size(mesh) * max(t.grad_accum_steps, 1)}"
        )
    model = build_model(model_cfg)
    schedule = make_schedule(
        t.schedule,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        num_steps=t.num_steps,
        min_learning_rate=t.min_learning_rate,
        d_model=model_cfg.d_model,
    )
    tx = make_optimizer(
        schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, grad_clip=t.grad_clip
    )
    example = {k: jnp.asarray(v[:1]) for k, v in dummy_batch(model_cfg, 1, 8).items()}

    def boxed_init(rng: jax.Array) -> TrainState:
        if "tokens" in example:
            variables = model.init(jax.random.wrap_key_data(rng), example["tokens"][:, :-1])
        else:
            variables = model.init(jax.random.wrap_key_data(rng), example["src"], example["tgt_in"])
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.fold_in(rng, 1),
        )

    rng_shape = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
        abstract_boxed = jax.eval_shape(boxed_init, rng_shape)
    state_sharding = shd.logical_to_sharding(abstract_boxed, mesh)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(abstract_boxed),
        state_sharding,
    )
    batch_sharding = shd.batch_sharding(mesh)

    def unboxed_init(rng: jax.Array) -> TrainState:
        return nn.meta.unbox(boxed_init(rng))

    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        label_smoothing=t.label_smoothing,
        num_classes=num_classes,
        accum_steps=max(t.grad_accum_steps, 1),
        skip_nonfinite=t.nonfinite == "skip",
    )
    return Setup(
        model_cfg=model_cfg,
        model=model,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        state_sharding=state_sharding,
        abstract_state=abstract_state,
        init_state=jax.jit(unboxed_init, out_shardings=state_sharding),
        train_step=jax.jit(
            step_fn,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, shd.replicated(mesh)),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            functools.partial(eval_step, model=model, num_classes=num_classes),
            in_shardings=(state_sharding.params, batch_sharding),
            out_shardings=shd.replicated(mesh),
        ),
    )


def within_mesh(setup: Setup) -> Any:
    """Context for tracing model code: the mesh and the logical axis rules."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(setup.mesh))
    stack.enter_context(nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES))
    return stack


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def evaluate(setup: Setup, params: Any, batches: Any) -> dict[str, float]:
    totals = {"nll_sum": 0.0, "tokens": 0.0}
    with within_mesh(setup):
        for local in batches:
            out = setup.eval_step(params, shd.global_batch(local, setup.mesh))
            totals = {k: totals[k] + float(out[k]) for k in totals}
    if totals["tokens"] == 0:
        return {}
    loss = totals["nll_sum"] / totals["tokens"]
    return {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0)))}


# ---------------------------------------------------------------------------------------------
# The loop.


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_workdir_config(workdir: str, config: Any, model_cfg: ModelConfig) -> None:
    """A workdir holds one run: resuming it with a different model is an error, not a guess."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    saved_model = saved.get("model", {})
    diffs = [
        f"model.{k}: {saved_model.get(k)!r} -> {v!r}"
        for k, v in model_cfg.to_dict().items()
        if k in saved_model and saved_model[k] != v and k not in RUNTIME_MODEL_FIELDS
    ]
    if diffs:
        raise ConfigError(
            f"workdir {workdir} holds a run of a different model ({'; '.join(diffs)}); use a new "
            "--workdir, or the same model settings to resume"
        )


# Fields that change how a model is computed, not what it is; they may differ on resume.
RUNTIME_MODEL_FIELDS = (
    "dtype",
    "scan_layers",
    "remat_policy",
    "attention_impl",
    "dropout_rate",
    "attention_dropout_rate",
)


def _initial_params_from(init_from: str, setup: Setup) -> Any:
    """Parameters to fine-tune from: another run's workdir or a Hugging Face GPT-2 directory."""
    if os.path.exists(os.path.join(init_from, "checkpoints")):
        from transformer.inference import load_params

        source_cfg, params = load_params(init_from)
        if source_cfg.scan_layers != setup.model_cfg.scan_layers:
            from transformer.convert import stack_layers, unstack_layers

            params = (stack_layers if setup.model_cfg.scan_layers else unstack_layers)(params)
    elif os.path.exists(os.path.join(init_from, "config.json")):
        from transformer.convert import load_hf_gpt2

        source_cfg, params = load_hf_gpt2(
            init_from,
            pad_vocab_to=setup.model_cfg.vocab_size,
            scan_layers=setup.model_cfg.scan_layers,
        )
    else:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r} is neither a run directory (with checkpoints/) "
            "nor a Hugging Face GPT-2 directory (with config.json); check the path"
        )
    ignored = (*RUNTIME_MODEL_FIELDS, "vocab_size", "init_std")
    source, mine = source_cfg.to_dict(), setup.model_cfg.to_dict()
    diffs = [
        f"model.{k}: {source[k]!r} there, {mine[k]!r} here"
        for k in mine
        if k not in ignored and source.get(k) != mine[k]
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint.init_from={init_from} holds another model ({'; '.join(diffs)}); use "
            "the same model.* settings as that checkpoint"
        )
    source_vocab = jax.tree.leaves(params["embed"]["token_embedding"])[0].shape[0]
    if source_vocab != setup.model_cfg.vocab_size:
        raise ConfigError(
            f"checkpoint.init_from={init_from} has {source_vocab} embedding rows but this run's "
            f"model.vocab_size is {setup.model_cfg.vocab_size}; fine-tune with the tokenizer "
            "of that run (data.tokenizer=gpt2 for GPT-2 weights)"
        )
    return jax.tree.map(
        lambda x, s: jax.device_put(np.asarray(x, s.dtype), s.sharding),
        params,
        setup.abstract_state.params,
    )


def train_and_evaluate(config: Any, workdir: str) -> TrainResult:
    """Trains (or resumes) the run in `workdir` up to `config.train.num_steps`."""
    from transformer.data import make_data
    from transformer.reliability import StopSignal, truncate_metrics

    t = config.train
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    data = make_data(
        config.data,
        global_batch_size=t.batch_size,
        seed=t.seed,
        workdir=workdir,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model_cfg = resolve_model_config(config, data.tokenizer.vocab_size)
    check_workdir_config(workdir, config, model_cfg)
    setup = make_setup(config, model_cfg, num_classes=data.tokenizer.vocab_size)
    if is_main:
        resolved = config.to_dict()
        resolved["model"] = model_cfg.to_dict()
        _write_json_atomic(os.path.join(workdir, "config.json"), resolved)

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    with within_mesh(setup):
        restored = checkpoints.restore_latest_good(setup.abstract_state, data.train_iter)
        if restored is not None:
            start, state = restored
        else:
            start = 0
            state = setup.init_state(jax.random.key_data(jax.random.key(t.seed)))
            if config.checkpoint.init_from:
                state = state.replace(
                    params=_initial_params_from(config.checkpoint.init_from, setup)
                )
    # Metric sums pending since the last log at `start`: a resume between log steps logs the
    # same numbers as an uninterrupted run. Records a killed run logged past `start` are dropped.
    pending = _pending_metrics(setup, checkpoints.read_metrics(start) if restored else None)
    if is_main:
        truncate_metrics(workdir, start)
        if restored is not None:
            print(f"resuming from the checkpoint at step {start}", flush=True)
    num_params = count_params(state.params)
    seq_len = config.data.seq_len
    flops_token = flops_per_token(model_cfg, num_params, seq_len)
    peak, peak_source = (t.peak_flops, "config") if t.peak_flops else peak_flops_per_device()
    # Simulated CPU devices share the same cores: the measured peak is the machine's.
    devices = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
    if is_main:
        print(
            f"workdir {workdir}: {model_cfg.num_decoder_layers}-layer "
            f"{'GPT' if model_cfg.is_decoder_only else 'encoder-decoder'}, "
            f"{num_params:,} parameters, mesh {dict(setup.mesh.shape)}, "
            f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})",
            flush=True,
        )

    writer = MetricsWriter(workdir, enabled=is_main)
    stop = StopSignal()
    last: dict[str, Any] = {}
    timer = _Throughput(start)

    from tqdm import tqdm

    bar = tqdm(
        total=t.num_steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train"
    )
    step = start
    try:
        with within_mesh(setup), stop:
            last_step = min(t.stop_at_step or t.num_steps, t.num_steps)
            while step < last_step and not stop.requested:
                batch = shd.global_batch(next(data.train_iter), setup.mesh)
                state, metrics = setup.train_step(state, batch)
                pending = _accumulate(pending, metrics, step + 1)  # on device: no host sync
                step += 1
                stop.check_preemption(step)  # multi-process: JAX's preemption sync point
                bar.update(1)
                final = step == t.num_steps
                log_now = final or step % t.log_every_steps == 0
                eval_now = final or (t.eval_every_steps and step % t.eval_every_steps == 0)
                busy = time.perf_counter()  # logging, evaluating and saving are not training
                if log_now or eval_now:
                    summed = jax.device_get(pending)  # the one host sync
                    _check_finite(summed, None, t, checkpoints)
                    record = _summarise(
                        summed, step, timer, setup, t, flops_token / (peak * devices)
                    )
                    pending = _pending_metrics(setup)
                    if eval_now:
                        batches = data.eval_batches(t.eval_batches or None)
                        record.update(evaluate(setup, state.params, batches))
                    if final and data.eval_pairs and t.bleu_pairs:
                        record["bleu"] = _bleu(setup, state.params, data, t)
                    writer.write(step, record)
                    last = {"step": step, **record}
                    bar.set_postfix(
                        {
                            k: f"{v:.4g}"
                            for k, v in record.items()
                            if k in ("train_loss", "val_loss", "tokens_per_sec", "mfu")
                        }
                    )
                    if jax.process_count() > 1:
                        stop.sync()  # all processes agree, so all save the same step together
                if (
                    final
                    or stop.requested
                    or step == last_step
                    or step % config.checkpoint.every_steps == 0
                ):
                    # Steps since the last log may have gone non-finite: never save such a state.
                    summed = jax.device_get(pending)
                    _check_finite(summed, state.params, t, checkpoints)
                    checkpoints.save(step, state, data.train_iter, config.to_dict(), _plain(summed))
                if log_now or eval_now:
                    timer.restart(step)
                else:
                    timer.exclude(time.perf_counter() - busy)
            checkpoints.wait()
    finally:
        bar.close()
        writer.close()
        checkpoints.close()
    if is_main and stop.requested:
        print(
            f"stopped by {stop.signal_name} at step {step}; checkpoint saved, run the same "
            "command to resume",
            flush=True,
        )
    elif is_main and step < t.num_steps:
        print(
            f"stopped at train.stop_at_step={step} with a checkpoint; run again with "
            "stop_at_step=0 to continue",
            flush=True,
        )
    elif is_main:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k in ("train_loss", "val_loss", "bleu")
        )
        print(f"done: step {step}, {shown}", flush=True)
    return TrainResult(
        metrics=last,
        state=state,
        setup=setup,
        tokenizer=data.tokenizer,
        stopped_early=step < t.num_steps,
        eval_pairs=data.eval_pairs,
    )


class _Throughput:
    """Wall time spent training since the last log: excludes evaluation and saving."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step, self.excluded = time.perf_counter(), step, 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.time - self.excluded, 1e-9)


# Sums of the step metrics since the last log, kept on device (and in checkpoints).
_PENDING_DTYPES = {
    "loss_sum": np.float32,
    "nll_sum": np.float32,
    "tokens": np.float32,
    "grad_norm": np.float32,
    "nonfinite": np.int32,  # steps with a non-finite loss or gradient norm
    "steps": np.int32,
    "first_nonfinite": np.int32,  # the first such step, 0 = none
}


def _pending_metrics(setup: Setup, saved: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """Zero sums (or a checkpoint's), replicated over the mesh like the step's metrics."""
    sharding = shd.replicated(setup.mesh)
    values = {k: np.asarray((saved or {}).get(k, 0), d) for k, d in _PENDING_DTYPES.items()}
    return {
        k: jax.make_array_from_callback((), sharding, lambda _, v=v: v) for k, v in values.items()
    }


@jax.jit
def _accumulate(
    pending: dict[str, jax.Array], metrics: dict[str, jax.Array], step: jax.Array
) -> dict[str, jax.Array]:
    # A non-finite step (skipped, or about to stop the run) is counted, not summed.
    finite = metrics["nonfinite"] == 0
    out = {k: pending[k] + jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
    out["nonfinite"] = pending["nonfinite"] + metrics["nonfinite"]
    out["steps"] = pending["steps"] + 1
    first = (metrics["nonfinite"] > 0) & (pending["first_nonfinite"] == 0)
    out["first_nonfinite"] = jnp.where(first, step, pending["first_nonfinite"])
    return out


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _plain(summed: dict[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).item() for k, v in summed.items()}


def _check_finite(summed: dict[str, Any], params: Any, t: Any, checkpoints: Checkpoints) -> None:
    """Raises NonFiniteError when a step since the last log went non-finite and
    train.nonfinite='stop', or when `params` (about to be saved) are not all finite."""
    from transformer.reliability import NonFiniteError

    bad_step = int(summed["first_nonfinite"]) if t.nonfinite == "stop" else 0
    if not bad_step and (params is None or bool(_all_finite(params))):
        return
    newest = checkpoints.latest_step()
    kept = f"the checkpoint at step {newest} is kept" if newest else "no checkpoint was saved"
    what = (
        f"non-finite loss or gradients at step {bad_step}" if bad_step else "non-finite parameters"
    )
    raise NonFiniteError(
        f"{what} ({kept}); lower train.learning_rate or raise train.warmup_steps, or set "
        "train.nonfinite=skip to skip non-finite updates"
    )


def _summarise(
    summed: dict[str, Any],
    step: int,
    timer: _Throughput,
    setup: Setup,
    t: Any,
    mfu_per_token_per_sec: float,
) -> dict[str, Any]:
    tokens_per_sec = float(summed["tokens"]) / timer.elapsed()
    finite_steps = int(summed["steps"]) - int(summed["nonfinite"])
    record: dict[str, Any] = {
        # NaN when every step since the last log was skipped as non-finite
        "train_loss": float(summed["nll_sum"] / summed["tokens"]) if finite_steps else math.nan,
        "learning_rate": float(setup.schedule(step - 1)),
        "tokens_per_sec": tokens_per_sec,
        "mfu": tokens_per_sec * mfu_per_token_per_sec,
        "grad_norm": float(summed["grad_norm"]) / finite_steps if finite_steps else math.nan,
    }
    if summed["nonfinite"]:  # train.nonfinite=skip: those updates were not applied
        record["nonfinite_steps"] = int(summed["nonfinite"])
    return record


def _bleu(setup: Setup, params: Any, data: Any, t: Any) -> float:
    from transformer.inference import bleu

    score, _ = bleu(
        setup.model_cfg,
        jax.device_get(params),
        data.tokenizer,
        data.eval_pairs[: t.bleu_pairs],
        beam_size=t.beam_size,
        alpha=t.beam_alpha,
    )
    return score


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last logged record (step, train_loss, val_loss, ...)
    state: TrainState
    setup: Setup
    tokenizer: Any
    stopped_early: bool  # a signal or train.stop_at_step ended the run before num_steps
    eval_pairs: list[tuple[str, str]] | None = None  # translation: held-out (source, target)
