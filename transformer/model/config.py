"""`ModelConfig`: the one object every module receives, frozen and validated once.

Presets name the architectures of the papers: `transformer_base` and `transformer_big` are the
rows of Table 3 in "Attention Is All You Need"; `gpt2_small` (124M) and `gpt2_medium` (350M) are
GPT-2's; `smollm_135m` is a Llama-style decoder (rotary positions, SwiGLU, RMSNorm, grouped-query
attention). Derive variants with `dataclasses.replace(cfg, dropout_rate=0.0)` or
`preset('gpt2_small', vocab_size=65)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from transformer.errors import ConfigError
from transformer.model.ops import KERNEL_CHOICES

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
NORM_POSITIONS = ("post", "pre")
NORM_TYPES = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rope")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")
LOSS_IMPLS = ("fused", "reference")
LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")  # transformer.model.lora


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of an encoder-decoder Transformer or a decoder-only GPT."""

    vocab_size: int = 256  # embedding rows; may exceed the tokenizer's size (padding)
    real_vocab_size: int = 0  # ids that are tokens; rows past them pad, never predicted; 0 = all
    d_model: int = 512  # residual stream width
    num_heads: int = 8  # attention heads; d_model must divide by it
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: num_heads, 1: MQA
    d_ff: int = 2048  # hidden width of the position-wise feed-forward network
    num_encoder_layers: int = 6  # 0 for a decoder-only model (GPT)
    num_decoder_layers: int = 6  # layers of the (causal) decoder stack
    max_len: int = 512  # longest sequence; size of learned position table and caches
    dropout_rate: float = 0.1  # on embeddings and every sub-layer output (sec. 5.4)
    attention_dropout_rate: float = 0.0  # on attention weights (GPT-2's attn_pdrop)
    activation: str = "relu"  # FFN: relu (paper) | gelu (GPT-2, tanh) | swiglu (Llama) | geglu
    norm_position: str = "post"  # post: LN(x + f(x)) (paper) | pre: x + f(LN(x)) (GPT-2)
    norm_type: str = "layernorm"  # layernorm | rmsnorm
    norm_epsilon: float = 1e-6  # GPT-2 uses 1e-5
    positions: str = "sinusoidal"  # sinusoidal (sec. 3.5) | learned (GPT-2) | rope (Llama)
    rope_theta: float = 10000.0  # rotary base wavelength (RoFormer: 10000; Llama 3: 500000)
    tie_embeddings: bool = True  # output projection shares the token embedding (sec. 3.4)
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (sec. 3.4)
    use_bias: bool = True  # biases in dense layers and norms
    init_std: float = 0.0  # 0: Xavier-uniform kernels (paper); >0: N(0, std) as GPT-2 (0.02)
    dtype: str = "float32"  # compute dtype; softmax, norms statistics and logits stay float32
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = False  # nn.scan over layers: one compiled layer, stacked parameters
    scan_unroll: int = 1  # with scan_layers: layers per scan iteration (faster, longer compile)
    remat_policy: str = "none"  # rematerialisation: none | full | dots | dots_with_no_batch_dims
    attention_impl: str = "einsum"  # einsum (explicit, returns weights) | xla | cudnn | auto
    kernels: str = "auto"  # hot ops: auto (per platform) | reference (autodiff) | cpu (tuned)
    loss_chunk_len: int = 0  # loss over this many positions at a time (no [b,t,v] logits); 0=all
    loss_impl: str = "fused"  # fused (no float32 logits, own backward) | reference (autodiff)
    lora_rank: int = 0  # LoRA adapter rank on lora_targets (then only they train); 0 = none
    lora_alpha: float = 16.0  # adapters scaled by lora_alpha / lora_rank
    lora_targets: str = "q,v"  # comma list of q, k, v, qkv (one for all three), o, gate, up, down
    lora_dropout: float = 0.0  # dropout on the adapters' input in training

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"model.{field}={getattr(self, field)!r}: {message}")

        for field in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            check(
                isinstance(getattr(self, field), int) and getattr(self, field) > 0,
                field,
                "must be a positive integer",
            )
        check(
            isinstance(self.real_vocab_size, int) and 0 <= self.real_vocab_size <= self.vocab_size,
            "real_vocab_size",
            f"must be in [0, model.vocab_size={self.vocab_size}] (0 = every row is a token)",
        )
        for field in ("num_encoder_layers", "num_decoder_layers"):
            check(
                isinstance(getattr(self, field), int) and getattr(self, field) >= 0,
                field,
                "must be a non-negative integer",
            )
        check(
            self.num_decoder_layers > 0,
            "num_decoder_layers",
            "every model needs a decoder; set it to at least 1",
        )
        check(
            self.d_model % self.num_heads == 0,
            "d_model",
            f"must be divisible by model.num_heads={self.num_heads}; pick a multiple of it",
        )
        check(
            self.positions != "sinusoidal" or self.d_model % 2 == 0,
            "d_model",
            "sinusoidal positions need an even width; use an even d_model or positions='learned'",
        )
        for field in ("dropout_rate", "attention_dropout_rate"):
            check(0.0 <= getattr(self, field) < 1.0, field, "must be in [0, 1)")
        check(self.norm_epsilon > 0, "norm_epsilon", "must be positive")
        check(
            isinstance(self.num_kv_heads, int)
            and self.num_kv_heads >= 0
            and self.num_heads % (self.num_kv_heads or self.num_heads) == 0,
            "num_kv_heads",
            f"must divide model.num_heads={self.num_heads} (0 means num_heads: no grouping)",
        )
        check(
            self.positions != "rope" or self.head_dim % 2 == 0,
            "positions",
            "rotary positions rotate pairs of dimensions; use an even d_model // num_heads",
        )
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.loss_chunk_len >= 0, "loss_chunk_len", "must be >= 0 (0 = no chunks)")
        check(
            isinstance(self.scan_unroll, int) and self.scan_unroll >= 1,
            "scan_unroll",
            "must be a positive number of layers per scan iteration (1 = one)",
        )
        check(self.init_std >= 0, "init_std", "must be >= 0 (0 selects Xavier-uniform)")
        self._check_lora(check)
        choices = {
            "activation": ACTIVATIONS,
            "norm_position": NORM_POSITIONS,
            "norm_type": NORM_TYPES,
            "positions": POSITIONS,
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "remat_policy": REMAT_POLICIES,
            "attention_impl": ATTENTION_IMPLS,
            "kernels": KERNEL_CHOICES,
            "loss_impl": LOSS_IMPLS,
        }
        for field, allowed in choices.items():
            check(getattr(self, field) in allowed, field, f"must be one of {', '.join(allowed)}")

    def _check_lora(self, check: Any) -> None:
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        check(
            isinstance(self.lora_rank, int) and self.lora_rank >= 0,
            "lora_rank",
            "must be >= 0 (0 = no adapters)",
        )
        check(self.lora_alpha > 0, "lora_alpha", "must be positive")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        check(
            all(t in LORA_TARGETS for t in targets) and (targets or not self.lora_rank),
            "lora_targets",
            f"must be a comma list of {', '.join(LORA_TARGETS)}",
        )
        check(
            not ("qkv" in targets and {"q", "k", "v"} & set(targets)),
            "lora_targets",
            "qkv is one adapter for queries, keys and values together; use it or q, k, v",
        )
        check(
            not (self.lora_rank and "gate" in targets and not self.gated_ffn),
            "lora_targets",
            f"gate adapts the gate of a gated FFN (activation=swiglu or geglu), which this "
            f"model's {self.activation} FFN has not; use up and down for its MLP",
        )

    def describe(self) -> str:
        """'a 6-layer GPT' or 'a 6+6-layer encoder-decoder', for messages."""
        if self.is_decoder_only:
            return f"a {self.num_decoder_layers}-layer GPT"
        return f"a {self.num_encoder_layers}+{self.num_decoder_layers}-layer encoder-decoder"

    @property
    def num_classes(self) -> int:
        """Ids the model may predict: the tokenizer's, without the rows that pad the embedding."""
        return self.real_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or `num_heads` when it is 0."""
        return self.num_kv_heads or self.num_heads

    @property
    def gated_ffn(self) -> bool:
        """SwiGLU/GeGLU: the FFN has a gate and an up projection (`wi_gate`, `wi_up`)."""
        return self.activation in ("swiglu", "geglu")

    @property
    def is_decoder_only(self) -> bool:
        return self.num_encoder_layers == 0

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Builds a config, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def differences(
        self, other: ModelConfig, ignore: tuple[str, ...] = ()
    ) -> list[tuple[str, Any, Any]]:
        """`(field, other's value, this one's)` for every field that makes `other` a different
        model: all but the `RUNTIME_FIELDS` (how a model is computed, not what it is) and
        `ignore`. The one rule for "the same model?" (resuming a run, fine-tuning from one)."""
        skipped = {*RUNTIME_FIELDS, *ignore}
        # num_kv_heads 0 means num_heads: compare the heads each model really has.
        theirs = {**other.to_dict(), "num_kv_heads": other.kv_heads}
        mine = {**self.to_dict(), "num_kv_heads": self.kv_heads}
        return [(k, theirs[k], mine[k]) for k in mine if k not in skipped and theirs[k] != mine[k]]


# The adapters a run trains on top of a model (transformer.model.lora): part of what a run's
# checkpoints hold, but not of the base model a run starts from.
ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")

# Fields that change how a model is computed or trained, not what function it computes with
# given parameters: they may differ between a run and its resumption or its fine-tuning.
# (`scan_layers` is not one: it changes the parameters' layout, which a checkpoint keeps;
# fine-tuning converts it.)
RUNTIME_FIELDS = (
    "dtype",
    "scan_unroll",
    "remat_policy",
    "attention_impl",
    "kernels",
    "dropout_rate",
    "attention_dropout_rate",
    "loss_chunk_len",
    "loss_impl",
    "lora_dropout",
    "init_std",  # only the first initialisation reads it
)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows for a vocabulary: rounded up to a multiple for fast matmuls (GPT-2's
    50257 -> 50304). The extra ids are never produced or predicted."""
    return -(-vocab_size // multiple) * multiple


# The families Hugging Face interop knows, by the fields that make a model one of them (not its
# sizes): the presets start from these, and export checks a config against them (`family_problems`).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # GPT-2: pre-norm, GELU, learned positions, biases, output tied to the embedding.
    "gpt2": (
        "GPT-2",
        dict(
            num_encoder_layers=0,
            norm_position="pre",
            norm_type="layernorm",
            activation="gelu",
            positions="learned",
            tie_embeddings=True,
            scale_embeddings=False,
            use_bias=True,
        ),
    ),
    # The modern decoder (Llama, Mistral, Qwen, SmolLM): GPT-2 with rotary positions, a SwiGLU
    # FFN, RMSNorm and no biases (grouped-query attention and tying are set per size).
    "llama": (
        "Llama",
        dict(
            num_encoder_layers=0,
            norm_position="pre",
            norm_type="rmsnorm",
            activation="swiglu",
            positions="rope",
            scale_embeddings=False,
            use_bias=False,
        ),
    ),
}


def family_problems(cfg: ModelConfig, family: str) -> list[str]:
    """What stops `cfg` from being a model of `family` ('gpt2', 'llama'), each with the value the
    family needs; [] when it is one."""
    label, structure = FAMILIES[family]
    return [
        f"model.{field}={getattr(cfg, field)!r} ({label} needs {value!r})"
        for field, value in structure.items()
        if getattr(cfg, field) != value
    ]


# GPT-2's settings beyond its structure, shared by its sizes: GPT-2's vocabulary, context,
# dropout and N(0, 0.02) initialisation.
_GPT2: dict[str, Any] = dict(
    FAMILIES["gpt2"][1],
    vocab_size=50257,
    max_len=1024,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
    norm_epsilon=1e-5,
    init_std=0.02,
)

# Llama's: no dropout, an untied output layer, theta 10000 (Llama 3: 500000).
_LLAMA: dict[str, Any] = dict(
    FAMILIES["llama"][1],
    max_len=2048,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    norm_epsilon=1e-5,
    rope_theta=10000.0,
    init_std=0.02,
    tie_embeddings=False,
)

# The paper's Table 3 rows, GPT-2's sizes and Llama-style decoders. Vocabulary sizes are the
# papers'; override them with the tokenizer's (padded) size.
PRESETS: dict[str, dict[str, Any]] = {
    "transformer_base": dict(
        vocab_size=37000,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        max_len=256,
        dropout_rate=0.1,
    ),
    "transformer_big": dict(
        vocab_size=37000,
        d_model=1024,
        num_heads=16,
        d_ff=4096,
        num_encoder_layers=6,
        num_decoder_layers=6,
        max_len=256,
        dropout_rate=0.3,
    ),
    "gpt2_small": dict(_GPT2, d_model=768, num_heads=12, d_ff=3072, num_decoder_layers=12),
    "gpt2_medium": dict(_GPT2, d_model=1024, num_heads=16, d_ff=4096, num_decoder_layers=24),
    # SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M): a Llama with tied embeddings.
    "smollm_135m": dict(
        _LLAMA,
        vocab_size=49152,
        d_model=576,
        num_heads=9,
        num_kv_heads=3,
        d_ff=1536,
        num_decoder_layers=30,
        tie_embeddings=True,
    ),
    # Test sizes: small enough that a jit compile and a step take well under a second on CPU.
    "tiny_gpt": dict(
        _GPT2,
        vocab_size=64,
        d_model=32,
        num_heads=4,
        d_ff=64,
        num_decoder_layers=2,
        max_len=64,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
    "llama_tiny": dict(
        _LLAMA,
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        d_ff=64,
        num_decoder_layers=2,
        max_len=64,
    ),
    "tiny_transformer": dict(
        vocab_size=64,
        d_model=32,
        num_heads=4,
        d_ff=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_len=64,
        dropout_rate=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied: `preset('gpt2_small', vocab_size=65)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
