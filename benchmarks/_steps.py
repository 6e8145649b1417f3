"""The two timed train steps of the throughput benchmarks: the library's own (`Ours`) and
`transformers` GPT2LMHeadModel trained by torch (`Reference`), each warmed up by its caller and
stepped on the same tokens (`train_throughput.py`, `profile_trace.py`, `largest_model.py`)."""

from __future__ import annotations

import time
from typing import Any

import _common as common
import numpy as np

from transformer.model.sharding import global_batch
from transformer.train.config import RunConfig
from transformer.train.metrics import count_params
from transformer.train.trainer import Trainer


class Ours:
    """The library's own jitted, sharded, donated train step."""

    def __init__(self, config: Any, vocab: int, tokens: np.ndarray):
        run_cfg = RunConfig.from_any(config)
        self.model_cfg = run_cfg.model_config(vocab)
        self.setup = Trainer.build(run_cfg, self.model_cfg)
        with self.setup.within_mesh():
            self.state = self.setup.new_state(0)
            self.batch = global_batch({"tokens": tokens}, self.setup.mesh)
            start = time.perf_counter()
            lowered = self.setup.train_step.lower(self.state, self.batch)
            self.lower_s = time.perf_counter() - start
            start = time.perf_counter()
            self.step_fn = lowered.compile()
            self.compile_s = time.perf_counter() - start
        self.num_params = count_params(self.state.params)
        self.losses: list[float] = []

    def step(self) -> None:
        self.state, metrics = self.step_fn(self.state, self.batch)
        self.losses.append(float(metrics["loss_sum"] / metrics["tokens"]))  # waits for the step


class Reference:
    """transformers GPT2LMHeadModel of the same shape, with the same dropout, AdamW settings and
    gradient clipping, trained on the same tokens.

    On the CPU: float32, eager (unless `compile`), torch's default AdamW. On CUDA, as one would
    train it there: SDPA attention, bfloat16 autocast when our model computes in bfloat16, the
    fused AdamW, and (`compile`) the forward pass and loss under `torch.compile`. A compile that
    fails at the first step falls back to eager; `compile_error` says why."""

    def __init__(
        self,
        config: Any,
        model_cfg: Any,
        vocab: int,
        tokens: np.ndarray,
        device: str = "cpu",
        compile: bool = False,
    ):
        import torch
        import torch.nn.functional as F

        t = config.train
        self.torch, self.F = torch, F
        self.device = device
        self.model = common.reference_gpt2(model_cfg, vocab).to(device).train()
        if device == "cuda" and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("sdpa")
        self.attention = self.model.config._attn_implementation
        self.params = list(self.model.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        self.fused_adamw = device == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=(t.b1, t.b2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            **({"fused": True} if self.fused_adamw else {}),
        )
        self.autocast = device == "cuda" and model_cfg.dtype == "bfloat16"
        self.grad_clip = t.grad_clip
        self.tokens = torch.from_numpy(tokens).long().to(device)
        self.vocab = vocab
        self.compiled = compile
        self.compile_error: str | None = None
        self.loss_fn = torch.compile(self._loss) if compile else self._loss
        self.first_step_s: float | None = None
        self.losses: list[float] = []

    @property
    def description(self) -> str:
        parts = [f"torch {self.torch.__version__} {self.device.upper()}"]
        parts.append("bfloat16 autocast" if self.autocast else "float32")
        parts.append(f"{self.attention} attention")
        if self.fused_adamw:
            parts.append("fused AdamW")
        if self.compiled:
            parts.append("torch.compile")
        elif self.compile_error:
            parts.append("eager (torch.compile failed)")
        return "transformers GPT2LMHeadModel, " + ", ".join(parts)

    def _loss(self, inputs: Any, targets: Any) -> Any:
        with self.torch.autocast(self.device, self.torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=inputs).logits
        return self.F.cross_entropy(logits.float().reshape(-1, self.vocab), targets.reshape(-1))

    def _step(self) -> None:
        inputs, targets = self.tokens[:, :-1], self.tokens[:, 1:]
        loss = self.loss_fn(inputs, targets)
        loss.backward()
        if self.grad_clip > 0:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))  # waits for the step

    def step(self) -> None:
        if self.first_step_s is not None:
            self._step()
            return
        start = time.perf_counter()
        try:
            self._step()  # compiles, if compiling
        except Exception as error:
            if not self.compiled:
                raise
            self.compile_error = common.short_error(error)
            print(f"torch.compile failed, the reference runs eagerly: {self.compile_error}")
            self.compiled, self.loss_fn = False, self._loss
            self.optimizer.zero_grad(set_to_none=True)
            self._step()
        self.first_step_s = time.perf_counter() - start

    def peak_memory_bytes(self) -> int | None:
        """torch's peak allocated CUDA memory; None on the CPU (one process RSS for both)."""
        if self.device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())
