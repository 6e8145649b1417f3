"""The numeric kernels the layers call: pure functions of arrays, with no parameters and no
config. Shapes use the legend at the top of `transformer/model/layers.py`.

Each kernel with a hand-written backward pass has a `*_reference` twin with the same signature
and forward formula, differentiated by JAX; `tests/test_custom_gradients.py` checks both against
autodiff of the formula written out there. The layers call kernels only through this package's
names, and choose between a kernel and its reference with `kernels(choice)`: the config field
`model.kernels` is that choice.

  auto        per platform, as measured: 'cpu' on CPUs, 'reference' on GPUs and TPUs
  cpu         the hand-written backward passes below, tuned for XLA's CPU backend: on two cores
              they took the GPT step from below `transformers`+torch to 1.03-1.87x of it
              (`benchmarks/train_throughput.py`, docs/performance.md)
  reference   plain formulas differentiated by JAX, which leaves XLA's GPU and TPU compilers
              free to fuse bias and activation epilogues into the products and to choose
              layouts; `benchmarks/gpu_check.sh` measures both sets on a GPU

  self_attention   softmax(Q K^T / sqrt(d_k)) V from fused projections [b, t, 3, n, h]
  matmul           x [..., *in] . W [*in, *out]
  layer_norm       (x - mean) / sqrt(var + eps) * scale + bias over the last axis
  rms_norm         x / sqrt(mean(x^2) + eps) * scale over the last axis
  gelu             GELU, tanh approximation
  dot_product_attention   the plain formula over separate q, k, v; returns the weights too,
                          or calls `jax.nn.dot_product_attention` (XLA, cuDNN)
  cross_entropy    label-smoothed cross-entropy sums over the real classes, from logits in the
                   compute dtype, with a hand-written backward pass (`cross_entropy_reference`)
  chunked_cross_entropy   output projection + cross-entropy a chunk of positions at a time
  apply_rotary     rotary position embedding of queries or keys (RoFormer, Llama)
  dropout          dropout from 16 random bits per element (`keep_mask`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from transformer.model.ops.activations import gelu, gelu_reference
from transformer.model.ops.attention import (
    dot_product_attention,
    query_blocks,
    self_attention,
    self_attention_reference,
)
from transformer.model.ops.dense import matmul, matmul_reference
from transformer.model.ops.dropout import dropout, keep_mask
from transformer.model.ops.loss import (
    chunked_cross_entropy,
    cross_entropy,
    cross_entropy_reference,
    mask_vocab_padding,
)
from transformer.model.ops.norms import (
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from transformer.model.ops.rotary import apply_rotary, rotary_frequencies

KERNEL_CHOICES = ("auto", "reference", "cpu")
# What `auto` means on each platform, as measured (docs/performance.md, benchmarks/gpu_check.sh),
# for both of the choices it stands for: (model.kernels, model.attention_impl). The attention
# choice is the fastest a platform offers; a layer falls back to 'einsum' where that kernel
# cannot serve a call (`fused_attention_serves`). Platforms not listed take the last row.
AUTO: dict[str, tuple[str, str]] = {
    "cpu": ("cpu", "einsum"),
    "gpu": ("reference", "cudnn"),
    "tpu": ("reference", "einsum"),
}


def resolve_auto(platform: str | None = None) -> tuple[str, str]:
    """(kernel set, attention implementation) that `auto` picks on `platform` (default: JAX's
    default backend, the one `jax.jit` compiles for)."""
    return AUTO.get(platform or jax.default_backend(), AUTO["tpu"])


def fused_attention_serves(impl: str, dtype: object, head_dim: int) -> bool:
    """Whether the fused `jax.nn` kernel `impl` computes attention in `dtype` with heads
    `head_dim` wide: cuDNN's needs bfloat16 or float16 and heads of at most 128, in multiples
    of 8."""
    if impl != "cudnn":
        return True
    return dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation of each hot op; the sets share signatures and forward formulas."""

    name: str
    matmul: Callable[..., jax.Array]
    layer_norm: Callable[..., jax.Array]
    rms_norm: Callable[..., jax.Array]
    gelu: Callable[[jax.Array], jax.Array]
    # Fused self-attention over qkv [b, t, 3, n, h] for training and scoring, or None: the
    # layer then takes the plain `dot_product_attention` over q, k, v.
    self_attention: Callable[..., jax.Array] | None


CPU_KERNELS = Kernels("cpu", matmul, layer_norm, rms_norm, gelu, self_attention)
REFERENCE_KERNELS = Kernels(
    "reference", matmul_reference, layer_norm_reference, rms_norm_reference, gelu_reference, None
)


def kernels(choice: str = "auto", platform: str | None = None) -> Kernels:
    """The kernel set `choice` names; 'auto' picks by `platform` (`resolve_auto`)."""
    if choice == "auto":
        choice = resolve_auto(platform)[0]
    if choice == "cpu":
        return CPU_KERNELS
    if choice == "reference":
        return REFERENCE_KERNELS
    raise ValueError(f"unknown kernel set {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")


__all__ = [
    "AUTO",
    "CPU_KERNELS",
    "KERNEL_CHOICES",
    "REFERENCE_KERNELS",
    "Kernels",
    "apply_rotary",
    "chunked_cross_entropy",
    "cross_entropy",
    "cross_entropy_reference",
    "dot_product_attention",
    "dropout",
    "fused_attention_serves",
    "gelu",
    "gelu_reference",
    "keep_mask",
    "kernels",
    "layer_norm",
    "layer_norm_reference",
    "mask_vocab_padding",
    "matmul",
    "matmul_reference",
    "query_blocks",
    "resolve_auto",
    "rms_norm",
    "rms_norm_reference",
    "rotary_frequencies",
    "self_attention",
    "self_attention_reference",
]
