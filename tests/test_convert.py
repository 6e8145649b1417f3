"""GPT-2 interop against Hugging Face's own GPT2LMHeadModel: same logits, loss, greedy tokens,
and checkpoints that load both ways without missing keys. Tiny random models, no downloads."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

HF_EXTRA = "GPT-2 interop needs the hf extra: pip install torch && pip install -e '.[hf]'"

torch = pytest.importorskip("torch", reason=HF_EXTRA)
transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
pytest.importorskip("safetensors", reason=HF_EXTRA)

from transformer import GPT, preset  # noqa: E402
from transformer.config import padded_vocab_size  # noqa: E402
from transformer.convert import (  # noqa: E402
    ConvertError,
    config_from_hf,
    export_hf_gpt2,
    hf_config_from,
    load_hf_gpt2,
    params_from_hf_state_dict,
)

# Non-default context length, an odd head count, n_inner != 4 d, another epsilon and tanh-GELU
# spelling, small vocabularies; reorder_and_upcast_attn (eager attention only) is the same
# product in another order, so it converts too.
SIZES = {
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


# --------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize("size", SIZES)
def test_import_matches_hf_logits_and_loss(size):
    model = hf_gpt2(**SIZES[size])
    cfg, params = load_hf_gpt2(model)
    hf = model.config
    assert cfg == preset(
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

    # Full context length, so every position embedding row is used.
    tokens = random_tokens((3, hf.n_positions), hf.vocab_size)
    expected, ours = hf_logits(model, tokens), our_logits(cfg, params, tokens)
    assert np.abs(ours - expected).max() < 1e-4  # measured ~3e-7

    with torch.no_grad():
        hf_loss = model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss.item()
    log_probs = jax.nn.log_softmax(ours[:, :-1], axis=-1)
    our_loss = -np.take_along_axis(np.asarray(log_probs), tokens[:, 1:, None], -1).mean()
    assert abs(our_loss - hf_loss) < 1e-5


def test_every_source_gives_the_same_params(tmp_path):
    model = hf_gpt2(**SIZES["3x48"])
    _, expected = load_hf_gpt2(model)
    state = model.state_dict()

    model.save_pretrained(tmp_path / "safetensors")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 no longer writes .bin files; older checkpoints (OpenAI's GPT-2 included)
    # are pickled state dicts that also hold the causal-mask buffers, which must be ignored.
    legacy = {**state, "transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32)}
    legacy["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "bin").mkdir()
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "bin")
    # GPT2Model: bare names, no lm_head; config as a config.json dict.
    bare = {
        k.removeprefix("transformer."): v.numpy() for k, v in state.items() if k != "lm_head.weight"
    }
    config_dict = json.loads((tmp_path / "safetensors" / "config.json").read_text())

    sources = {
        "safetensors": (tmp_path / "safetensors", None),
        "sharded": (str(tmp_path / "sharded"), None),
        "bin": (tmp_path / "bin", None),
        "GPT2Model": (model.transformer, None),
        "bare state dict": (bare, config_dict),
    }
    for name, (source, config) in sources.items():
        cfg, params = load_hf_gpt2(source, config)
        assert cfg == config_from_hf(model.config), name
        assert_same_params(params, expected)


def test_import_pads_vocabulary_and_scans_layers():
    model = hf_gpt2(**SIZES["2x64"])
    _, params = load_hf_gpt2(model)
    cfg, padded = load_hf_gpt2(model, pad_vocab_to=128, scan_layers=True)
    assert cfg.vocab_size == 128 and cfg.scan_layers
    embedding = padded["embed"]["token_embedding"]
    np.testing.assert_array_equal(embedding[:101], params["embed"]["token_embedding"])
    assert not embedding[101:].any()  # zero rows: padded ids get logit 0, callers mask them
    assert padded["decoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (2, 64, 256)

    tokens = random_tokens((2, 20), 101)
    logits = our_logits(cfg, padded, tokens)
    assert np.abs(logits[..., :101] - hf_logits(model, tokens)).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize("scan_layers, hf_vocab", [(False, None), (True, 101)])
def test_export_round_trip(tmp_path, scan_layers, hf_vocab):
    cfg = preset(
        "tiny_gpt",
        vocab_size=128,
        d_model=48,
        num_heads=3,
        d_ff=96,
        max_len=40,
        num_decoder_layers=3,
    )
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    tokens = random_tokens((2, cfg.max_len), hf_vocab or cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(GPT(cfg).init)(jax.random.key(0), tokens[:, :4])["params"])
    # Perturb every leaf (biases and norms start at 0 and 1), reproducibly.
    rng = np.random.default_rng(1)  # NumPy: eager jax.random compiles once per leaf shape
    params = jax.tree.map(
        lambda x: np.asarray(x + 0.02 * rng.standard_normal(x.shape), np.float32), params
    )

    export_hf_gpt2(cfg, params, tmp_path, vocab_size=hf_vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.vocab_size == (hf_vocab or cfg.vocab_size)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied

    ours = our_logits(cfg, params, tokens)[..., : model.config.vocab_size]
    assert np.abs(ours - hf_logits(model.eval(), tokens)).max() < 1e-4

    back_cfg, back = load_hf_gpt2(tmp_path, pad_vocab_to=cfg.vocab_size, scan_layers=scan_layers)
    assert back_cfg == dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)
    if hf_vocab:  # rows beyond the HF vocabulary come back as zeros
        rows = np.asarray(params["embed"]["token_embedding"])
        np.testing.assert_array_equal(back["embed"]["token_embedding"][:hf_vocab], rows[:hf_vocab])
        assert not back["embed"]["token_embedding"][hf_vocab:].any()
        back["embed"]["token_embedding"] = rows
    assert_same_params(back, params)


# --------------------------------------------------------------------------------------------
# Generation.


def test_greedy_generation_matches_hf():
    # init_std 0.2 (10x GPT-2's) gives peaked logits: the top two differ by far more than the
    # ~1e-6 disagreement between the implementations, so argmax ties cannot flip a token.
    model = hf_gpt2(seed=3, init_std=0.2, **SIZES["2x64"])
    cfg, params = load_hf_gpt2(model)
    prompt = random_tokens((1, 5), cfg.vocab_size, seed=3)
    new = 20
    with torch.no_grad():
        hf = model.generate(
            torch.as_tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
        ).numpy()

    # Full forward pass over a fixed-length buffer (one compile): the model is causal, so the
    # unfilled slots after position `length - 1` cannot change its logits.
    forward = jax.jit(GPT(cfg).apply)
    buffer = np.zeros((1, prompt.shape[1] + new), np.int64)
    buffer[:, : prompt.shape[1]] = prompt
    gaps = []
    for length in range(prompt.shape[1], buffer.shape[1]):
        logits = np.asarray(forward({"params": params}, jnp.asarray(buffer)))[0, length - 1]
        top2 = np.sort(logits)[-2:]
        gaps.append(top2[1] - top2[0])
        buffer[0, length] = logits.argmax()
    assert min(gaps) > 1e-3  # no near-ties: measured 0.03, 1e4 x the implementations gap
    np.testing.assert_array_equal(buffer, hf)


# --------------------------------------------------------------------------------------------
# Tokenizer.


def test_gpt2_tokenizer_files_end_to_end(tmp_path):
    tokenizer_module = pytest.importorskip("transformer.tokenizer")
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

    ours = tokenizer_module.Tokenizer.from_gpt2_files(
        tmp_path / "vocab.json", tmp_path / "merges.txt"
    )
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    text = "the weather in the north, über alles. 42"
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.eos_id == theirs.eos_token_id == len(vocab) - 1

    model = hf_gpt2(**{**SIZES["2x64"], "vocab_size": len(vocab)})
    cfg, params = load_hf_gpt2(model, pad_vocab_to=padded_vocab_size(ours.vocab_size))
    tokens = np.array([[ours.eos_id, *ids]])
    logits = our_logits(cfg, params, tokens)[..., : len(vocab)]
    assert np.abs(logits - hf_logits(model, tokens)).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Errors.


def test_other_model_types_are_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ConvertError, match="model_type='bert'.*only 'gpt2'"):
        load_hf_gpt2(tmp_path)

    config_only = tmp_path / "config_only"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(config_only)
    with pytest.raises(ConvertError, match="has no GPT-2 weights.*model.safetensors"):
        load_hf_gpt2(config_only)


def test_state_dict_errors_name_the_tensors():
    model = hf_gpt2(**SIZES["2x64"])
    cfg = config_from_hf(model.config)
    state = dict(model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.2.ln_1.weight"] = torch.ones(64)  # a layer the config does not have
    with pytest.raises(ConvertError, match=r"missing tensors: h\.1\.mlp\.c_fc\.bias.*h\.2\.ln_1"):
        params_from_hf_state_dict(state, cfg)

    state = dict(model.state_dict())
    state["transformer.wpe.weight"] = torch.zeros(50, 64)
    with pytest.raises(ConvertError, match=r"wpe\.weight \(50, 64\) \(expected \(96, 64\)\)"):
        params_from_hf_state_dict(state, cfg)

    state = dict(model.state_dict())
    state["lm_head.weight"] = torch.zeros(101, 64)
    with pytest.raises(ConvertError, match="lm_head.weight differs"):
        params_from_hf_state_dict(state, cfg)
    with pytest.raises(ConvertError, match="pad_vocab_to=64 is smaller"):
        load_hf_gpt2(model, pad_vocab_to=64)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(activation_function="relu"), "activation_function='relu'"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
        (dict(n_embd=64, n_head=5), "model.d_model=64"),
    ],
)
def test_unsupported_hf_configs_are_rejected(change, message):
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4, **change}
    with pytest.raises(ConvertError, match=message):
        config_from_hf(config)


def test_unexportable_configs_are_rejected(tmp_path):
    cfg = preset("tiny_gpt", norm_position="post", activation="relu")
    with pytest.raises(ConvertError, match="norm_position='post'.*activation='relu'"):
        hf_config_from(cfg)
    with pytest.raises(ConvertError, match="vocab_size=65 must be in"):
        hf_config_from(preset("tiny_gpt"), vocab_size=65)

    cfg, params = load_hf_gpt2(hf_gpt2(**SIZES["2x64"]))
    with pytest.raises(ConvertError, match="params hold 28 arrays.*has 16"):
        export_hf_gpt2(dataclasses.replace(cfg, num_decoder_layers=1), params, tmp_path)
    with pytest.raises(ConvertError, match=r"mlp/wi/kernel has shape \(64, 256\).*\(64, 128\)"):
        export_hf_gpt2(dataclasses.replace(cfg, d_ff=128), params, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written on error


def test_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "from transformer import preset\n"
        "from transformer.convert import MissingDependencyError, hf_config_from\n"
        "try:\n"
        "    hf_config_from(preset('tiny_gpt'))\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert 'pip install -e ".[hf]"' in result.stdout
