"""Hugging Face interop against transformers' own GPT2LMHeadModel and LlamaForCausalLM: the same
logits, loss and greedy tokens, and checkpoints that load both ways without missing keys. One
set of tests, parametrised over the two families; tiny random float32 models, no downloads."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

HF_EXTRA = "Hugging Face interop needs the hf extra: pip install torch && pip install -e '.[hf]'"

torch = pytest.importorskip("torch", reason=HF_EXTRA)
transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
pytest.importorskip("safetensors", reason=HF_EXTRA)

from transformer import GPT, preset  # noqa: E402
from transformer.data.tokenizer import Tokenizer  # noqa: E402
from transformer.errors import ConfigError, ConvertError  # noqa: E402
from transformer.hf import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    export_hf,
    load_hf,
    params_from_hf,
)
from transformer.inference.gpt import _generate_ids  # noqa: E402
from transformer.model.config import padded_vocab_size  # noqa: E402
from transformer.train.finetune import initial_params  # noqa: E402

FAMILIES = ("gpt2", "llama")

# GPT-2: a non-default context length, an odd head count, n_inner != 4 d, another epsilon and
# tanh-GELU spelling, small vocabularies; reorder_and_upcast_attn (eager attention only) is the
# same product in another order, so it converts too.
GPT2_SIZES = {
    "2x64": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=96),
    "3x48": dict(
        n_layer=3,
        n_embd=48,
        n_head=3,
        n_inner=80,
        vocab_size=77,
        n_positions=32,
        layer_norm_epsilon=1e-6,
        activation_function="gelu_pytorch_tanh",
    ),
    "reordered": dict(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        reorder_and_upcast_attn=True,
        attn_implementation="eager",
    ),
}
LLAMA_BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=101,
    max_position_embeddings=64,
)
# Llama: multi-head (tied, like SmolLM), grouped-query (untied, like Llama 2/3), multi-query
# (three layers, another epsilon), Llama 3's RoPE base, and a Mistral without a sliding window
# (Llama's tensors and function under another model_type). One width, length and vocabulary
# throughout: eager ops compile once per shape, so the tests share them.
LLAMA_SIZES = {
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-untied": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1, num_hidden_layers=3, rms_norm_eps=1e-5),
    "theta-500k": dict(num_key_value_heads=2, rope_theta=500000.0),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
}
SIZES = {"gpt2": GPT2_SIZES, "llama": LLAMA_SIZES}
# The size each shared test uses: GPT-2's plain one, Llama's untied grouped one.
MAIN = {"gpt2": "2x64", "llama": "gqa-untied"}


def hf_gpt2(seed: int = 0, init_std: float = 0.02, **sizes):
    """A random float32 GPT2LMHeadModel in eval mode.

    HF starts biases at 0 and LayerNorms at 1; they are perturbed too, so a mapping mistake in
    any tensor changes the logits. BOS/EOS are unset: the vocabulary has no id 50256, and an
    EOS would let `generate` stop early.
    """
    config = transformers.GPT2Config(
        **sizes, initializer_range=init_std, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(init_std * torch.randn_like(p))
    return model


def hf_llama(seed: int = 0, init_std: float = 0.1, model_type: str = "llama", **sizes):
    """A random float32 LlamaForCausalLM (or MistralForCausalLM) in eval mode, eager attention.

    init_std 0.1 (5x Llama's) makes attention far from uniform, so a position mistake moves the
    logits well past the tolerance. HF starts RMSNorm weights at 1; they are perturbed too.
    BOS/EOS are unset, so `generate` never stops early.
    """
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    config = config_class(
        **{**LLAMA_BASE, **sizes},
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(init_std * torch.randn_like(p))
    return model


def hf_model(family: str, size: str | None = None, **kwargs):
    make = hf_gpt2 if family == "gpt2" else hf_llama
    return make(**{**SIZES[family][size or MAIN[family]], **kwargs})


def expected_config(family: str, hf):
    """Our config of the HF config `hf`, written out field by field."""
    if family == "gpt2":
        return preset(
            "gpt2_small",
            vocab_size=hf.vocab_size,
            d_model=hf.n_embd,
            num_heads=hf.n_head,
            num_decoder_layers=hf.n_layer,
            d_ff=hf.n_inner or 4 * hf.n_embd,
            max_len=hf.n_positions,
            norm_epsilon=hf.layer_norm_epsilon,
            dropout_rate=hf.resid_pdrop,
            attention_dropout_rate=hf.attn_pdrop,
        )
    kv = hf.num_key_value_heads
    return preset(
        "llama_tiny",
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=0 if kv == hf.num_attention_heads else kv,  # 0: not grouped
        d_ff=hf.intermediate_size,
        num_decoder_layers=hf.num_hidden_layers,
        max_len=hf.max_position_embeddings,
        norm_epsilon=hf.rms_norm_eps,
        rope_theta=hf.rope_parameters["rope_theta"],
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
    )


def random_params(cfg, seed: int = 1):
    """GPT params of `cfg`: N(0, 0.1) kernels and biases and N(1, 0.1) norm scales, drawn with
    NumPy over the shapes `init` would give (cheaper than running `init`)."""
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return (centre + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, jnp.asarray(tokens)))


def random_tokens(shape, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def assert_same_params(a, b) -> None:
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == np.float32, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def context(family: str, hf) -> int:
    return hf.n_positions if family == "gpt2" else hf.max_position_embeddings


# --------------------------------------------------------------------------------------------
# Import.

IMPORT_CASES = [(f, size) for f in FAMILIES for size in SIZES[f]]


@pytest.mark.parametrize("family, size", IMPORT_CASES, ids=[f"{f}-{s}" for f, s in IMPORT_CASES])
def test_import_matches_hf_logits_and_loss(family, size):
    model = hf_model(family, size)
    cfg, params = load_hf(model)
    assert cfg == expected_config(family, model.config)
    assert ("lm_head" in params) == (not cfg.tie_embeddings)

    # Full context length, so every position (embedding row or rotary angle) is used.
    tokens = random_tokens((2, context(family, model.config)), cfg.vocab_size)
    expected, ours = hf_logits(model, tokens), our_logits(cfg, params, tokens)
    assert np.abs(ours - expected).max() < 1e-4  # measured ~3e-7 (GPT-2), ~3e-6 (Llama)

    with torch.no_grad():
        hf_loss = model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss.item()
    log_probs = jax.nn.log_softmax(ours[:, :-1], axis=-1)
    our_loss = -np.take_along_axis(np.asarray(log_probs), tokens[:, 1:, None], -1).mean()
    assert abs(our_loss - hf_loss) < 1e-5
    if size == "theta-500k":  # the tolerance sees the RoPE base: 10000 is far off
        wrong = dataclasses.replace(cfg, rope_theta=10000.0)
        assert np.abs(our_logits(wrong, params, tokens) - expected).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_source_gives_the_same_params(tmp_path, family):
    model = hf_model(family)
    _, expected = load_hf(model)
    state = model.state_dict()
    prefix = "transformer." if family == "gpt2" else "model."

    model.save_pretrained(tmp_path / "safetensors")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 no longer writes .bin files; older checkpoints are pickled state dicts that
    # also hold buffers which must be ignored: GPT-2's causal mask and its fill value (OpenAI's
    # GPT-2 included), each Llama layer's rotary inv_freq.
    if family == "gpt2":
        buffers = {"h.0.attn.bias": torch.ones(1, 1, 32, 32), "h.0.attn.masked_bias": -1e4}
    else:
        buffers = {"layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    legacy = {**state, **{prefix + k: torch.as_tensor(v) for k, v in buffers.items()}}
    (tmp_path / "bin").mkdir()
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "bin")
    # The bare model's names (no prefix), NumPy values, the config as a config.json dict; for
    # Llama, with lm_head and an older config.json (a top-level rope_theta, rope_scaling null,
    # no head_dim).
    bare = {k.removeprefix(prefix): v.numpy() for k, v in state.items()}
    config_dict = json.loads((tmp_path / "safetensors" / "config.json").read_text())
    if family == "gpt2":
        del bare["lm_head.weight"]
    else:
        config_dict = {
            k: v for k, v in config_dict.items() if k not in ("rope_parameters", "head_dim")
        }
        config_dict.update(rope_theta=10000.0, rope_scaling=None)
    bare_model = model.transformer if family == "gpt2" else model.model

    sources = {
        "safetensors": (tmp_path / "safetensors", None),
        "sharded": (str(tmp_path / "sharded"), None),
        "bin": (tmp_path / "bin", None),
        "state dict": (state, model.config),
        "bare state dict": (bare, config_dict),
    }
    if family == "gpt2":  # GPT2Model: tied, so no lm_head needed
        sources["bare model"] = (bare_model, None)
    for name, (source, config) in sources.items():
        for chosen in (None, family):
            cfg, params = load_hf(source, config, family=chosen)
            assert cfg == config_from_hf(model.config), name
            assert_same_params(params, expected)
    if family == "llama":
        # A tied model also loads from LlamaModel, which has no lm_head; an untied one needs it.
        tied = hf_model("llama", "mha-tied")
        assert_same_params(load_hf(tied.model)[1], load_hf(tied)[1])
        with pytest.raises(ConvertError, match=r"missing tensors: lm_head\.weight \(an untied"):
            load_hf(bare_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_pads_vocabulary_and_scans_layers(family):
    model = hf_model(family)
    _, params = load_hf(model)
    cfg, padded = load_hf(model, pad_vocab_to=128, scan_layers=True)
    assert cfg.vocab_size == 128 and cfg.scan_layers and cfg.num_classes == 101
    embedding = padded["embed"]["token_embedding"]
    np.testing.assert_array_equal(embedding[:101], params["embed"]["token_embedding"])
    assert not embedding[101:].any()  # zero rows: padded ids get logit 0, callers mask them
    if family == "llama":
        assert not padded["lm_head"]["kernel"][:, 101:].any()
    wide = padded["decoder"]["layers"]["mlp"]["wi" if family == "gpt2" else "wi_up"]["kernel"]
    assert wide.shape[0] == 2  # a leading layer axis

    tokens = random_tokens((2, 20), 101)
    logits = our_logits(cfg, padded, tokens)
    assert np.abs(logits[..., :101] - hf_logits(model, tokens)).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Export.

EXPORT_CASES = [
    # family, scan_layers, num_kv_heads, tied, hf_vocab
    ("gpt2", False, 0, True, None),
    ("gpt2", True, 0, True, 101),
    ("llama", False, 0, True, None),
    ("llama", True, 2, False, 101),
]


def export_config(family: str, scan_layers: bool, kv_heads: int, tied: bool):
    if family == "gpt2":
        return preset(
            "tiny_gpt",
            vocab_size=128,
            d_model=48,
            num_heads=3,
            d_ff=96,
            max_len=40,
            num_decoder_layers=3,
            scan_layers=scan_layers,
        )
    return preset(
        "llama_tiny",
        vocab_size=128,
        d_model=64,
        num_heads=4,
        num_kv_heads=kv_heads,
        d_ff=96,
        max_len=64,
        rope_theta=20000.0,
        norm_epsilon=1e-6,
        tie_embeddings=tied,
        scan_layers=scan_layers,
    )


@pytest.mark.parametrize("family, scan_layers, kv_heads, tied, hf_vocab", EXPORT_CASES)
def test_export_round_trip(tmp_path, family, scan_layers, kv_heads, tied, hf_vocab):
    """Both ways, unrolled and tied; scanned with a padded vocabulary (the import pads it again:
    zero embedding rows and lm_head columns beyond the HF vocabulary), for Llama untied and
    grouped too."""
    cfg = export_config(family, scan_layers, kv_heads, tied)
    tokens = random_tokens((2, cfg.max_len), hf_vocab or cfg.vocab_size)
    params = random_params(cfg)

    export_hf(cfg, params, tmp_path, vocab_size=hf_vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model_class = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
    }[family]
    model, info = model_class.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.vocab_size == (hf_vocab or cfg.vocab_size)
    embeddings = model.get_input_embeddings().weight
    assert (model.lm_head.weight.data_ptr() == embeddings.data_ptr()) == tied
    if family == "llama":
        assert model.config.num_key_value_heads == cfg.kv_heads

    ours = our_logits(cfg, params, tokens)[..., : model.config.vocab_size]
    assert np.abs(ours - hf_logits(model.eval(), tokens)).max() < 1e-4

    back_cfg, back = load_hf(tmp_path, pad_vocab_to=cfg.vocab_size, scan_layers=scan_layers)
    dropout = dict(dropout_rate=0.0, attention_dropout_rate=0.0) if family == "gpt2" else {}
    real = dict(real_vocab_size=hf_vocab or cfg.vocab_size)
    assert back_cfg == dataclasses.replace(cfg, **dropout, **real)
    if hf_vocab:  # ids past the HF vocabulary come back as zero rows (and lm_head columns)
        embedding = back["embed"]["token_embedding"]
        assert not embedding[hf_vocab:].any()
        embedding[hf_vocab:] = params["embed"]["token_embedding"][hf_vocab:]
        if not tied:
            head = back["lm_head"]["kernel"]
            assert not head[:, hf_vocab:].any()
            head[:, hf_vocab:] = params["lm_head"]["kernel"][:, hf_vocab:]
    assert_same_params(back, params)


# --------------------------------------------------------------------------------------------
# Generation.


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf(family):
    # A large init_std (10x GPT-2's, 15x Llama's) gives peaked logits: the top two differ by far
    # more than the ~1e-6 disagreement between the implementations, so ties cannot flip a token.
    model = hf_model(family, seed=3, init_std=0.2 if family == "gpt2" else 0.3)
    cfg, params = load_hf(model, pad_vocab_to=128)  # padded ids must never be chosen
    vocab, new = model.config.vocab_size, 20
    # Two prompts, the shorter left-padded: positions restart after the padding on both sides.
    prompts = [random_tokens((6,), vocab, seed=3), random_tokens((4,), vocab, seed=4)]
    batch = np.zeros((2, 6), np.int64)
    mask = np.zeros((2, 6), np.int64)
    for row, prompt in enumerate(prompts):
        batch[row, 6 - len(prompt) :], mask[row, 6 - len(prompt) :] = prompt, 1
    with torch.no_grad():
        hf = model.generate(
            torch.as_tensor(batch),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=0,
        ).numpy()[:, 6:]

    ours = _generate_ids(
        params,
        jnp.asarray(batch, jnp.int32),
        jnp.asarray(6 - mask.sum(1), jnp.int32),
        jax.random.key(0),
        cfg=cfg,
        max_new_tokens=new,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        eos_id=None,
    )
    np.testing.assert_array_equal(np.asarray(ours), hf)

    # No near-ties in what HF chose (each row alone, unpadded, one forward pass).
    gaps = []
    for row, prompt in enumerate(prompts):
        sequence = np.concatenate([prompt, hf[row]])[None]
        top2 = np.sort(hf_logits(model, sequence)[0, len(prompt) - 1 : -1], axis=-1)[:, -2:]
        gaps.append((top2[:, 1] - top2[:, 0]).min())
    assert min(gaps) > 1e-3


# --------------------------------------------------------------------------------------------
# Tokenizer (GPT-2's files).


def test_gpt2_tokenizer_files_end_to_end(tmp_path):
    from tokenizers import pre_tokenizers

    # A GPT-2-shaped vocabulary: the 256 byte symbols, a few merges, <|endoftext|> last.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (tmp_path / "merges.txt").write_text(merges_txt)

    ours = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    text = "the weather in the north, über alles. 42"
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.eos_id == theirs.eos_token_id == len(vocab) - 1

    model = hf_gpt2(**{**GPT2_SIZES["2x64"], "vocab_size": len(vocab)})
    cfg, params = load_hf(model, pad_vocab_to=padded_vocab_size(ours.vocab_size))
    tokens = np.array([[ours.eos_id, *ids]])
    logits = our_logits(cfg, params, tokens)[..., : len(vocab)]
    assert np.abs(logits - hf_logits(model, tokens)).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("family", FAMILIES)
def test_other_model_types_are_rejected(tmp_path, family):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ConvertError, match=f"model_type='bert'; only '{family}'"):
        load_hf(tmp_path, family=family)
    with pytest.raises(ConvertError, match="model_type='bert'; supported: 'gpt2'.*'llama'"):
        load_hf(tmp_path)

    config_only = tmp_path / "config_only"
    hf_model(family).config.save_pretrained(config_only)
    label = {"gpt2": "GPT-2", "llama": "Llama"}[family]
    with pytest.raises(ConvertError, match=f"has no {label} weights.*model.safetensors"):
        load_hf(config_only)


# Per family: (a tensor to delete, a tensor of a layer the config lacks, a tensor given the
# wrong shape, the messages).
STATE_DICT_ERRORS = {
    "gpt2": (
        "transformer.h.1.mlp.c_fc.bias",
        "transformer.h.2.ln_1.weight",
        ("transformer.wpe.weight", (50, 64)),
        r"missing tensors: h\.1\.mlp\.c_fc\.bias.*h\.2\.ln_1",
        r"wpe\.weight \(50, 64\) \(expected \(96, 64\)\)",
    ),
    "llama": (
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.input_layernorm.weight",
        ("model.layers.0.self_attn.k_proj.weight", (64, 64)),  # not grouped
        r"missing tensors: layers\.1\.mlp\.up_proj.*unexpected.*layers\.2",
        r"k_proj\.weight \(64, 64\) \(expected \(32, 64\)\)",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_errors_name_the_tensors(family):
    deleted, extra, (wrong, shape), names_message, shape_message = STATE_DICT_ERRORS[family]
    model = hf_model(family)
    cfg = config_from_hf(model.config)
    state = dict(model.state_dict())
    del state[deleted]
    state[extra] = torch.ones(64)
    with pytest.raises(ConvertError, match=names_message):
        params_from_hf(state, cfg)

    state = dict(model.state_dict())
    state[wrong] = torch.zeros(shape)
    with pytest.raises(ConvertError, match=shape_message):
        params_from_hf(state, cfg)

    state = dict(model.state_dict())
    state["lm_head.weight"] = torch.zeros(101, 64)
    with pytest.raises(ConvertError, match="lm_head.weight differs"):
        params_from_hf(state, dataclasses.replace(cfg, tie_embeddings=True))
    with pytest.raises(ConvertError, match="pad_vocab_to=64 is smaller"):
        load_hf(model, pad_vocab_to=64)


UNSUPPORTED = [
    ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    ("gpt2", dict(n_embd=64, n_head=5), "model.d_model=64"),
    ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type='linear'"),
    (
        "llama",
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        "rope_type='yarn'.*supported: 'default'",
    ),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type='llama3'"),
    ("llama", dict(attention_bias=True), "attention_bias=True"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("llama", dict(head_dim=32), r"head_dim=32 \(.*= 16\)"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
    ("llama", dict(hidden_size=64, num_attention_heads=5), "model.d_model=64"),
    # Every problem at once.
    ("llama", dict(attention_bias=True, hidden_act="gelu"), "hidden_act='gelu'.*attention_bias"),
]


@pytest.mark.parametrize("family, change, message", UNSUPPORTED)
def test_unsupported_hf_configs_are_rejected(family, change, message):
    if family == "gpt2":
        config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4, **change}
    else:
        config = {"model_type": "llama", **LLAMA_BASE, **change}
    with pytest.raises(ConvertError, match=message):
        config_from_hf(config)


# Per family: a model of the other structure and the message, the two wrong-params messages.
UNEXPORTABLE = {
    "gpt2": (
        dict(norm_position="post", activation="relu"),
        "norm_position='post'.*activation='relu'",
        "params hold 28 arrays.*has 16",
        r"mlp/wi/kernel has shape \(64, 256\).*\(64, 128\)",
    ),
    "llama": (
        dict(norm_type="layernorm", activation="gelu", use_bias=True),
        "norm_type='layernorm'.*activation='gelu'.*use_bias",
        r"19 arrays.*has 11 \(unexpected decoder/layers_1/mlp/wi_gate/kernel, .* 4 more\)",
        r"wi_gate/kernel has shape \(64, 96\).*\(64, 128\)",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_unexportable_configs_are_rejected(tmp_path, family):
    other, message, layers_message, shape_message = UNEXPORTABLE[family]
    base = preset("tiny_gpt" if family == "gpt2" else "llama_tiny")
    with pytest.raises(ConvertError, match=message):
        config_to_hf(dataclasses.replace(base, **other), family=family)
    with pytest.raises(ConvertError, match="neither a GPT-2 nor a Llama"):
        export_hf(preset("tiny_transformer"), {}, tmp_path)
    with pytest.raises(ConvertError, match="vocab_size=65 must be in"):
        config_to_hf(base, vocab_size=65)

    cfg, params = load_hf(hf_model(family))
    with pytest.raises(ConvertError, match=layers_message):
        export_hf(dataclasses.replace(cfg, num_decoder_layers=1), params, tmp_path)
    with pytest.raises(ConvertError, match=shape_message):
        export_hf(dataclasses.replace(cfg, d_ff=128), params, tmp_path)
    if family == "llama":
        with pytest.raises(ConvertError, match="has 18 .unexpected lm_head/kernel.; pass the"):
            export_hf(dataclasses.replace(cfg, tie_embeddings=True), params, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written on error


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_import_needs_no_torch(tmp_path, family):
    model = hf_model(family, "3x48" if family == "gpt2" else "mqa")  # three layers
    model.save_pretrained(tmp_path)
    code = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "from transformer.errors import MissingDependencyError\n"
        "from transformer.hf import config_to_hf, load_hf\n"
        f"cfg, params = load_hf({str(tmp_path)!r})\n"
        "print(cfg.num_decoder_layers, cfg.kv_heads)\n"
        "try:\n"
        "    config_to_hf(cfg)\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.startswith("3 3\n" if family == "gpt2" else "3 1\n")
    assert 'pip install -e ".[hf]"' in result.stdout


# --------------------------------------------------------------------------------------------
# Fine-tuning from a directory.


def test_finetune_starts_from_a_llama_directory(tmp_path):
    model = hf_model("llama", "mha-tied")
    model.save_pretrained(tmp_path)
    cfg = dataclasses.replace(config_from_hf(model.config), vocab_size=128)
    for scan in (False, True):
        mine = dataclasses.replace(cfg, scan_layers=scan, init_std=0.02, dropout_rate=0.1)
        params = initial_params(str(tmp_path), mine)
        _, expected = load_hf(tmp_path, pad_vocab_to=128, scan_layers=scan)
        assert_same_params(params, expected)
    # num_kv_heads=num_heads is the same model as num_kv_heads=0.
    initial_params(str(tmp_path), dataclasses.replace(cfg, num_kv_heads=cfg.num_heads))

    with pytest.raises(ConfigError, match=r"model\.rope_theta: 10000.0 there, 500000.0 here"):
        initial_params(str(tmp_path), dataclasses.replace(cfg, rope_theta=500000.0))
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads: 4 there, 2 here") as refused:
        initial_params(str(tmp_path), dataclasses.replace(cfg, num_kv_heads=2, d_ff=7))
    # The fix, as the flags to add.
    flags = f"--config.model.num_kv_heads=4 --config.model.d_ff={cfg.d_ff}"
    assert str(refused.value).endswith(f"settings as that checkpoint: {flags}")

    # LoRA trains no embedding rows: tokens the base has no trained rows for (chat tokens
    # added to its tokenizer) are refused; full fine-tuning trains them.
    tokens = model.config.vocab_size
    more_tokens = dataclasses.replace(cfg, real_vocab_size=tokens + 2)
    adapters = dataclasses.replace(more_tokens, lora_rank=4, lora_targets="q,v")
    with pytest.raises(ConfigError, match=r"has 2 tokens that checkpoint.init_from=.* no trained"):
        initial_params(str(tmp_path), adapters)
    initial_params(str(tmp_path), more_tokens)
    initial_params(str(tmp_path), dataclasses.replace(adapters, real_vocab_size=tokens))
