"""Llama interop against Hugging Face's own LlamaForCausalLM: same logits, greedy tokens, and
checkpoints that load both ways without missing keys. Tiny random float32 models, no downloads."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

HF_EXTRA = "Llama interop needs the hf extra: pip install torch && pip install -e '.[hf]'"

torch = pytest.importorskip("torch", reason=HF_EXTRA)
transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
pytest.importorskip("safetensors", reason=HF_EXTRA)

from transformer import GPT, preset  # noqa: E402
from transformer.config import ConfigError  # noqa: E402
from transformer.convert import (  # noqa: E402
    ConvertError,
    config_from_hf_llama,
    export_hf_llama,
    hf_llama_config_from,
    load_hf,
    load_hf_llama,
    params_from_hf_llama_state_dict,
)

BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=101,
    max_position_embeddings=64,
)
# Multi-head (tied, like SmolLM), grouped-query (untied, like Llama 2/3), multi-query (three
# layers, another epsilon), Llama 3's RoPE base, and a Mistral without a sliding window
# (Llama's tensors and function under another model_type). One width, length and vocabulary
# throughout: eager ops compile once per shape, so the tests share them.
SIZES = {
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-untied": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1, num_hidden_layers=3, rms_norm_eps=1e-5),
    "theta-500k": dict(num_key_value_heads=2, rope_theta=500000.0),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
}


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
        **{**BASE, **sizes},
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


def random_params(cfg, seed: int = 1):
    """GPT params of `cfg`: N(0, 0.1) kernels and N(1, 0.1) norm scales, drawn with NumPy over
    the shapes `init` would give (cheaper than running `init`)."""
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
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))


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


# --------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize("size", SIZES)
def test_import_matches_hf_logits(size):
    model = hf_llama(**SIZES[size])
    cfg, params = load_hf_llama(model)
    hf = model.config
    kv = hf.num_key_value_heads
    assert cfg == preset(
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
    assert cfg.kv_heads == kv
    assert ("lm_head" in params) == (not hf.tie_word_embeddings)

    # Full context length, so every rotary position is used.
    tokens = random_tokens((2, hf.max_position_embeddings), hf.vocab_size)
    expected = hf_logits(model, tokens)
    assert np.abs(our_logits(cfg, params, tokens) - expected).max() < 1e-4  # measured ~3e-6
    if size == "theta-500k":  # the tolerance sees the RoPE base: 10000 is far off
        wrong = dataclasses.replace(cfg, rope_theta=10000.0)
        assert np.abs(our_logits(wrong, params, tokens) - expected).max() > 1e-2


def test_every_source_gives_the_same_params(tmp_path):
    model = hf_llama(**SIZES["gqa-untied"])
    _, expected = load_hf_llama(model)
    state = model.state_dict()

    model.save_pretrained(tmp_path / "safetensors")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 writes no .bin files; older Llama checkpoints are pickled state dicts that
    # also hold each layer's rotary inv_freq buffer, which must be ignored.
    legacy = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    (tmp_path / "bin").mkdir()
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "bin")
    # LlamaModel's names (no `model.`) plus lm_head, NumPy values; an older config.json, with
    # a top-level rope_theta, rope_scaling null and no head_dim.
    bare = {k.removeprefix("model."): v.numpy() for k, v in state.items()}
    config_dict = json.loads((tmp_path / "safetensors" / "config.json").read_text())
    old_config = {k: v for k, v in config_dict.items() if k not in ("rope_parameters", "head_dim")}
    old_config.update(rope_theta=10000.0, rope_scaling=None)

    sources = {
        "safetensors": (tmp_path / "safetensors", None),
        "sharded": (str(tmp_path / "sharded"), None),
        "bin": (tmp_path / "bin", None),
        "state dict": (state, model.config),
        "bare state dict, old config.json": (bare, old_config),
    }
    for name, (source, config) in sources.items():
        for load in (load_hf_llama, load_hf):
            cfg, params = load(source, config)
            assert cfg == config_from_hf_llama(model.config), name
            assert_same_params(params, expected)

    # A tied model also loads from LlamaModel, which has no lm_head.
    tied = hf_llama(**SIZES["mha-tied"])
    assert_same_params(load_hf_llama(tied.model)[1], load_hf_llama(tied)[1])
    with pytest.raises(ConvertError, match=r"missing tensors: lm_head\.weight \(an untied"):
        load_hf_llama(model.model)


# --------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize(
    "scan_layers, kv_heads, tied, hf_vocab", [(False, 0, True, None), (True, 2, False, 101)]
)
def test_export_round_trip(tmp_path, scan_layers, kv_heads, tied, hf_vocab):
    """Both ways: unrolled, tied, not grouped; scanned, untied, grouped, padded vocabulary (the
    import pads it again: zero embedding rows and lm_head columns beyond the HF vocabulary)."""
    cfg = preset(
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
    tokens = random_tokens((2, cfg.max_len), hf_vocab or cfg.vocab_size)
    params = random_params(cfg)

    export_hf_llama(cfg, params, tmp_path, vocab_size=hf_vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.vocab_size == (hf_vocab or cfg.vocab_size)
    assert model.config.num_key_value_heads == cfg.kv_heads
    tied_in_hf = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied_in_hf == tied

    ours = our_logits(cfg, params, tokens)[..., : model.config.vocab_size]
    assert np.abs(ours - hf_logits(model.eval(), tokens)).max() < 1e-4

    back_cfg, back = load_hf_llama(tmp_path, pad_vocab_to=cfg.vocab_size, scan_layers=scan_layers)
    assert back_cfg == cfg
    if hf_vocab:  # ids past the HF vocabulary come back as zero embedding rows, head columns
        embedding, head = back["embed"]["token_embedding"], back["lm_head"]["kernel"]
        assert not embedding[hf_vocab:].any() and not head[:, hf_vocab:].any()
        embedding[hf_vocab:] = params["embed"]["token_embedding"][hf_vocab:]
        head[:, hf_vocab:] = params["lm_head"]["kernel"][:, hf_vocab:]
    assert_same_params(back, params)


# --------------------------------------------------------------------------------------------
# Generation.


def test_greedy_generation_matches_hf():
    # init_std 0.3 gives peaked logits: the top two differ by far more than the ~1e-6
    # disagreement between the implementations, so argmax ties cannot flip a token.
    model = hf_llama(seed=3, init_std=0.3, **SIZES["gqa-untied"])
    cfg, params = load_hf_llama(model, pad_vocab_to=128)  # padded ids must never be chosen
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

    from transformer.inference import _generate_ids

    ours = _generate_ids(
        params,
        jnp.asarray(batch, jnp.int32),
        jnp.asarray(6 - mask.sum(1), jnp.int32),
        jax.random.key(0),
        cfg=cfg,
        num_classes=vocab,
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
# Errors.


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type='linear'"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
            "rope_type='yarn'.*supported: 'default'",
        ),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type='llama3'"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(head_dim=32), r"head_dim=32 \(.*= 16\)"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="gpt2"), "model_type='gpt2'; only 'llama'"),
        (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
        (dict(hidden_size=64, num_attention_heads=5), "model.d_model=64"),
    ],
)
def test_unsupported_hf_configs_are_rejected(change, message):
    config = {"model_type": "llama", **BASE, **change}
    with pytest.raises(ConvertError, match=message):
        config_from_hf_llama(config)


def test_every_problem_is_named_at_once():
    config = {**BASE, "model_type": "llama", "attention_bias": True, "hidden_act": "gelu"}
    with pytest.raises(ConvertError, match="hidden_act='gelu'.*attention_bias=True"):
        config_from_hf_llama(config)


def test_state_dict_errors_name_the_tensors():
    model = hf_llama(**SIZES["gqa-untied"])
    cfg = config_from_hf_llama(model.config)
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.2.input_layernorm.weight"] = torch.ones(64)  # a layer cfg lacks
    with pytest.raises(
        ConvertError, match=r"missing tensors: layers\.1\.mlp\.up_proj.*unexpected.*layers\.2"
    ):
        params_from_hf_llama_state_dict(state, cfg)

    state = dict(model.state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # not grouped
    with pytest.raises(ConvertError, match=r"k_proj\.weight \(64, 64\) \(expected \(32, 64\)\)"):
        params_from_hf_llama_state_dict(state, cfg)

    tied = dataclasses.replace(cfg, tie_embeddings=True)
    with pytest.raises(ConvertError, match="lm_head.weight differs"):
        params_from_hf_llama_state_dict(model.state_dict(), tied)
    with pytest.raises(ConvertError, match="pad_vocab_to=64 is smaller"):
        load_hf_llama(model, pad_vocab_to=64)


def test_other_sources_are_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConvertError, match="model_type='bert'; only 'llama'"):
        load_hf_llama(tmp_path)
    with pytest.raises(ConvertError, match="model_type='bert'; supported: 'gpt2'.*'llama'"):
        load_hf(tmp_path)

    config_only = tmp_path / "config_only"
    transformers.LlamaConfig(**BASE).save_pretrained(config_only)
    with pytest.raises(ConvertError, match="has no Llama weights.*model.safetensors"):
        load_hf_llama(config_only)


def test_unexportable_configs_are_rejected(tmp_path):
    with pytest.raises(ConvertError, match="norm_type='layernorm'.*activation='gelu'.*use_bias"):
        hf_llama_config_from(preset("tiny_gpt"))
    with pytest.raises(ConvertError, match="vocab_size=65 must be in"):
        hf_llama_config_from(preset("llama_tiny"), vocab_size=65)

    cfg, params = load_hf_llama(hf_llama(**SIZES["gqa-untied"]))
    with pytest.raises(
        ConvertError,
        match=r"19 arrays.*has 11 \(unexpected decoder/layers_1/mlp/wi_gate/kernel, .* 4 more\)",
    ):
        export_hf_llama(dataclasses.replace(cfg, num_decoder_layers=1), params, tmp_path)
    with pytest.raises(ConvertError, match=r"wi_gate/kernel has shape \(64, 96\).*\(64, 128\)"):
        export_hf_llama(dataclasses.replace(cfg, d_ff=128), params, tmp_path)
    with pytest.raises(ConvertError, match="has 18 .unexpected lm_head/kernel.; pass the config"):
        export_hf_llama(dataclasses.replace(cfg, tie_embeddings=True), params, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written on error


# --------------------------------------------------------------------------------------------
# Fine-tuning and dependencies.


def test_finetune_starts_from_a_llama_directory(tmp_path):
    from transformer.finetune import initial_params

    model = hf_llama(**SIZES["mha-tied"])
    model.save_pretrained(tmp_path)
    cfg = dataclasses.replace(config_from_hf_llama(model.config), vocab_size=128)
    for scan in (False, True):
        mine = dataclasses.replace(cfg, scan_layers=scan, init_std=0.02, dropout_rate=0.1)
        params = initial_params(str(tmp_path), mine)
        _, expected = load_hf_llama(tmp_path, pad_vocab_to=128, scan_layers=scan)
        assert_same_params(params, expected)
    # num_kv_heads=num_heads is the same model as num_kv_heads=0.
    initial_params(str(tmp_path), dataclasses.replace(cfg, num_kv_heads=cfg.num_heads))

    with pytest.raises(ConfigError, match=r"model\.rope_theta: 10000.0 there, 500000.0 here"):
        initial_params(str(tmp_path), dataclasses.replace(cfg, rope_theta=500000.0))
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads: 4 there, 2 here"):
        initial_params(str(tmp_path), dataclasses.replace(cfg, num_kv_heads=2))


def test_safetensors_import_needs_no_torch(tmp_path):
    hf_llama(**SIZES["mqa"]).save_pretrained(tmp_path)  # three layers, one kv head
    code = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "from transformer.convert import MissingDependencyError, hf_llama_config_from, "
        "load_hf_llama\n"
        f"cfg, params = load_hf_llama({str(tmp_path)!r})\n"
        "print(cfg.num_decoder_layers, cfg.kv_heads)\n"
        "try:\n"
        "    hf_llama_config_from(cfg)\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.startswith("3 1\n")
    assert 'pip install -e ".[hf]"' in result.stdout
