"""The model core against independent expectations: the paper's formulas, NumPy, exact counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import GPT, ConfigError, EncoderDecoder, ModelConfig, preset
from transformer.model import ops
from transformer.model.blocks import Stack
from transformer.model.embeddings import sinusoidal_table
from transformer.model.layers import Dense, causal_mask, segment_mask


def init(model, *args, **kwargs):
    return nn.meta.unbox(model.init(jax.random.key(0), *args, **kwargs)["params"])


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def tokens(shape, vocab=64, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Scaled dot-product attention against NumPy.


def numpy_attention(q, k, v, mask):
    """softmax(Q K^T / sqrt(d_k)) V per head, written from the formula in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask), scores, -1e30)
    scores -= scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v), weights


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "segment", "causal+segment"])
def test_attention_matches_numpy(kind):
    b, t, n, h = 2, 6, 3, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (b, t, n, h)) for key in keys)
    lengths = jnp.array([6, 4])
    padding = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)  # 1 real, 0 pad
    packed = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    mask = {
        "none": None,
        "causal": causal_mask(t),
        "padding": segment_mask(jnp.ones((b, t), jnp.int32), padding),
        "segment": segment_mask(packed, packed),
        "causal+segment": causal_mask(t) & segment_mask(packed, packed),
    }[kind]
    out, weights = ops.dot_product_attention(q, k, v, mask)
    expected_out, expected_weights = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(out, expected_out, atol=1e-5)
    np.testing.assert_allclose(weights, expected_weights, atol=1e-5)
    if mask is not None:  # masked keys get exactly zero weight
        hidden = ~np.broadcast_to(np.asarray(mask), weights.shape)
        rows_with_keys = np.asarray(mask).any(-1, keepdims=True)
        assert np.all(
            np.asarray(weights)[hidden & np.broadcast_to(rows_with_keys, hidden.shape)] == 0.0
        )


def test_sinusoidal_table_is_the_papers_formula():
    table = sinusoidal_table(50, 16)
    for pos in (0, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            np.testing.assert_allclose(table[pos, 2 * i], np.sin(angle), atol=1e-6)
            np.testing.assert_allclose(table[pos, 2 * i + 1], np.cos(angle), atol=1e-6)


def test_attention_weights_can_be_inspected():
    cfg = preset("tiny_gpt")
    model = GPT(cfg)
    x = tokens((2, 5))
    params = init(model, x)
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    weights = state["intermediates"]["decoder"]["layers_0"]["self_attention"]["attention_weights"][
        0
    ]
    assert weights.shape == (2, cfg.num_heads, 5, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(jnp.triu(weights, k=1)).max()) == 0.0  # causal


# --------------------------------------------------------------------------------------------
# Causality and padding invariance.


def test_gpt_causality_by_gradient():
    """d logits[:, i] / d (input embedding at j) == 0 exactly for every j > i.

    With learned positions, row j of the position table is added only to the input at position
    j, so its gradient is the gradient with respect to that input embedding."""
    cfg = preset("tiny_gpt", num_decoder_layers=2)
    model = GPT(cfg)
    x = tokens((1, 8))
    params = init(model, x)
    for i in range(8):

        def out_i(position_table, i=i):
            p = jax.tree.map(lambda a: a, params)
            p["embed"]["position_embedding"] = position_table
            return model.apply({"params": p}, x)[0, i].sum()

        grad = jax.grad(out_i)(params["embed"]["position_embedding"])  # [max_len, d]
        assert float(jnp.abs(grad[i + 1 : 8]).max(initial=0.0)) == 0.0
        assert float(jnp.abs(grad[: i + 1]).max()) > 0.0


@pytest.mark.parametrize("cross", [False, True])
def test_decoder_stack_causality_by_gradient(cross):
    cfg = preset("tiny_transformer")
    stack = Stack(cfg, 2, cross=cross)
    x = jax.random.normal(jax.random.key(0), (1, 7, cfg.d_model))
    memory = jax.random.normal(jax.random.key(1), (1, 5, cfg.d_model)) if cross else None
    params = init(stack, x, causal_mask(7), memory)
    # A random projection of the output, not its sum: the stack ends in a LayerNorm, whose
    # outputs sum to a constant, so the gradient of the sum is zero everywhere.
    w = jax.random.normal(jax.random.key(2), (cfg.d_model,))
    for i in range(7):
        grad = jax.grad(
            lambda x, i=i: stack.apply({"params": params}, x, causal_mask(7), memory)[0, i] @ w
        )(x)
        assert float(jnp.abs(grad[0, i + 1 :]).max(initial=0.0)) == 0.0
        assert float(jnp.abs(grad[0, : i + 1]).max()) > 0.0


def test_changing_later_tokens_leaves_earlier_logits_unchanged():
    gpt = GPT(preset("tiny_gpt"))
    x = tokens((2, 10))
    params = init(gpt, x)
    changed = x.at[:, 6:].set((x[:, 6:] + 1) % 64)
    a, b = gpt.apply({"params": params}, x), gpt.apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])

    model = EncoderDecoder(preset("tiny_transformer"))
    src = tokens((2, 7), seed=3)
    params = init(model, src, x)
    a = model.apply({"params": params}, src, x)
    b = model.apply({"params": params}, src, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])


def test_encoder_padding_invariance():
    model = EncoderDecoder(preset("tiny_transformer"))
    src, tgt = tokens((2, 5), seed=1), tokens((2, 4), seed=2)
    params = init(model, src, tgt)
    ones = jnp.ones((2, 5), jnp.int32)
    plain = model.apply({"params": params}, src, method=model.encode, src_segment_ids=ones)
    padded_src = jnp.concatenate([src, jnp.zeros((2, 3), jnp.int32)], axis=1)
    padded_seg = jnp.concatenate([ones, jnp.zeros((2, 3), jnp.int32)], axis=1)
    padded = model.apply(
        {"params": params}, padded_src, method=model.encode, src_segment_ids=padded_seg
    )
    np.testing.assert_allclose(padded[:, :5], plain, atol=1e-5)
    # And the decoder's logits do not see the padding either (cross-attention mask).
    logits = model.apply({"params": params}, src, tgt, src_segment_ids=ones)
    logits_padded = model.apply({"params": params}, padded_src, tgt, src_segment_ids=padded_seg)
    np.testing.assert_allclose(logits_padded, logits, atol=1e-5)


@pytest.mark.parametrize("decoder_only", [True, False])
def test_fused_causal_attention_equals_jax_attention_in_the_model(decoder_only):
    """Length 64 takes the fused self-attention with its causal split: loss and gradients equal
    the model built on `jax.nn.dot_product_attention` (an independent implementation)."""
    fused = preset("tiny_gpt" if decoder_only else "tiny_transformer", max_len=64)
    other = dataclasses.replace(fused, attention_impl="xla")
    x = tokens((2, 64), seed=4)
    src = tokens((2, 40), seed=5)

    def loss(cfg, params):
        model = GPT(cfg) if decoder_only else EncoderDecoder(cfg)
        logits = (
            model.apply({"params": params}, x)
            if decoder_only
            else model.apply({"params": params}, src, x)
        )
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(64))

    args = (x,) if decoder_only else (src, x)
    params = init(GPT(fused) if decoder_only else EncoderDecoder(fused), *args)
    (a, grad_a), (b, grad_b) = (jax.value_and_grad(lambda p, c=c: loss(c, p))(params)
                                for c in (fused, other))  # fmt: skip
    np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), grad_a, grad_b
    )


def test_decoder_self_mask_is_always_causal():
    """EncoderDecoder.decode combines a caller's self_mask with the causal mask."""
    model = EncoderDecoder(preset("tiny_transformer", max_len=64))
    src, tgt = tokens((2, 9), seed=3), tokens((2, 64), seed=4)
    params = init(model, src, tgt)
    encoded = model.apply({"params": params}, src, method=model.encode)

    def decode(self_mask):
        return model.apply(
            {"params": params}, tgt, encoded, self_mask=self_mask, method=model.decode
        )

    everything = jnp.ones((1, 1, 64, 64), bool)
    np.testing.assert_array_equal(decode(everything), decode(None))


def test_packed_rows_equal_separate_rows():
    """Two sequences packed into one row with segment ids give each one's own logits."""
    gpt = GPT(preset("tiny_gpt"))
    a, b = tokens((1, 4), seed=5), tokens((1, 3), seed=6)
    params = init(gpt, a)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2]])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
    out = gpt.apply({"params": params}, packed, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(out[:, :4], gpt.apply({"params": params}, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 4:], gpt.apply({"params": params}, b), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Parameter counts and names.


def test_gpt2_small_has_124m_parameters():
    model = GPT(preset("gpt2_small"))
    shapes = jax.eval_shape(lambda: init(model, jnp.zeros((1, 8), jnp.int32)))
    assert count(shapes) == 124_439_808


def test_transformer_base_parameter_count_matches_formula():
    cfg = preset("transformer_base", vocab_size=37000)
    shapes = jax.eval_shape(
        lambda: init(
            EncoderDecoder(cfg), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32)
        )
    )
    v, d, f, n_enc, n_dec = 37000, 512, 2048, 6, 6
    attention = 4 * (d * d + d)  # W_Q, W_K, W_V, W_O with biases
    ffn = d * f + f + f * d + d
    norm = 2 * d  # LayerNorm scale and bias
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    embedding = v * d  # shared by source, target and the pre-softmax projection (sec. 3.4)
    expected = embedding + n_enc * encoder_layer + n_dec * decoder_layer
    assert count(shapes) == expected == 63_082_496


def paths(params):
    return sorted(
        "/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
    )


def test_parameter_names_are_stable():
    """Parameter names are a checkpoint format: this list changes only on purpose."""
    gpt = GPT(preset("tiny_gpt", num_decoder_layers=1))
    assert paths(init(gpt, tokens((1, 4)))) == [
        "decoder/final_norm/bias",
        "decoder/final_norm/scale",
        "decoder/layers_0/mlp/wi/bias",
        "decoder/layers_0/mlp/wi/kernel",
        "decoder/layers_0/mlp/wo/bias",
        "decoder/layers_0/mlp/wo/kernel",
        "decoder/layers_0/norm_mlp/bias",
        "decoder/layers_0/norm_mlp/scale",
        "decoder/layers_0/norm_self_attention/bias",
        "decoder/layers_0/norm_self_attention/scale",
        "decoder/layers_0/self_attention/out/bias",
        "decoder/layers_0/self_attention/out/kernel",
        "decoder/layers_0/self_attention/qkv/bias",
        "decoder/layers_0/self_attention/qkv/kernel",
        "embed/position_embedding",
        "embed/token_embedding",
    ]
    model = EncoderDecoder(preset("tiny_transformer", num_encoder_layers=1, num_decoder_layers=1))
    names = paths(init(model, tokens((1, 4)), tokens((1, 4))))
    assert [p for p in names if "/cross_attention" in p] == [
        "decoder/layers_0/cross_attention/key_value/bias",
        "decoder/layers_0/cross_attention/key_value/kernel",
        "decoder/layers_0/cross_attention/out/bias",
        "decoder/layers_0/cross_attention/out/kernel",
        "decoder/layers_0/cross_attention/query/bias",
        "decoder/layers_0/cross_attention/query/kernel",
    ]
    assert "embed/token_embedding" in names and not any("final_norm" in p for p in names)
    assert len([p for p in names if p.startswith("encoder/layers_0/")]) == 12


def test_dense_reads_its_input_sizes_and_names_every_kernel_axis():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))  # [b, t, n, h]
    dense = Dense(features=6, kernel_axes=("heads", "kv", "embed"), contract_axes=2)
    boxed = dense.init(jax.random.key(1), x)["params"]
    assert boxed["kernel"].value.shape == (4, 8, 6)
    assert boxed["kernel"].names == ("heads", "kv", "embed") and boxed["bias"].names == ("embed",)
    params = nn.meta.unbox(boxed)
    params["bias"] = jnp.arange(6.0)
    expected = jnp.einsum("btnh,nhd->btd", x, params["kernel"]) + params["bias"]
    np.testing.assert_allclose(dense.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one name per axis"):
        Dense(features=6, kernel_axes=("embed", "mlp"), contract_axes=2).init(jax.random.key(1), x)


def test_every_parameter_has_logical_axes():
    cfg = preset("tiny_transformer")
    boxed = EncoderDecoder(cfg).init(jax.random.key(0), tokens((1, 4)), tokens((1, 4)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim
    names = {name for x in leaves for name in x.names}
    assert {"embed", "heads", "kv", "mlp", "vocab"} <= names


# --------------------------------------------------------------------------------------------
# Variants.

VARIANTS = [
    dict(norm_position="post", activation="relu", positions="sinusoidal", tie_embeddings=True),
    dict(norm_position="pre", activation="gelu", positions="learned", tie_embeddings=False),
    dict(norm_type="rmsnorm", use_bias=False, scale_embeddings=False),
    dict(dtype="bfloat16"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("decoder_only", [True, False])
def test_variants_run_under_jit(variant, decoder_only):
    cfg = preset("tiny_gpt" if decoder_only else "tiny_transformer", **variant)
    model = GPT(cfg) if decoder_only else EncoderDecoder(cfg)
    args = (tokens((2, 6)),) if decoder_only else (tokens((2, 5)), tokens((2, 6)))
    params = init(model, *args)
    logits = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)
    assert logits.shape == (2, 6, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    names = paths(params)
    assert ("lm_head/kernel" in names) == (not cfg.tie_embeddings)
    assert ("embed/position_embedding" in names) == (cfg.positions == "learned")
    assert any("final_norm" in p for p in names) == (cfg.norm_position == "pre")
    assert any(p.endswith("bias") for p in names) == cfg.use_bias


def test_dropout_is_active_only_in_training():
    cfg = preset("tiny_gpt", dropout_rate=0.5)
    model = GPT(cfg)
    x = tokens((2, 6))
    params = init(model, x)
    eval_a = model.apply({"params": params}, x)
    eval_b = model.apply({"params": params}, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = model.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(train, eval_a)


def stack_layers(params, prefix_tree):
    """Unrolled layers_i -> one scanned 'layers' subtree with a leading layer axis."""
    out = {}
    for name, sub in prefix_tree.items():
        if isinstance(sub, dict) and "layers_0" in sub:
            layer_keys = sorted(k for k in sub if k.startswith("layers_"))
            rest = {k: v for k, v in sub.items() if not k.startswith("layers_")}
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[sub[k] for k in layer_keys])
            out[name] = {**rest, "layers": stacked}
        else:
            out[name] = sub
    return out


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("decoder_only", [True, False])
def test_scan_and_remat_equal_plain_model(remat, decoder_only):
    name = "tiny_gpt" if decoder_only else "tiny_transformer"
    cls = GPT if decoder_only else EncoderDecoder
    args = (tokens((2, 6)),) if decoder_only else (tokens((2, 5)), tokens((2, 6)))
    plain_cfg = preset(name)
    params = init(cls(plain_cfg), *args)
    scanned = cls(dataclasses.replace(plain_cfg, scan_layers=True, remat_policy=remat))
    scanned_params = stack_layers(params, params)
    assert jax.tree.structure(scanned_params) == jax.tree.structure(init(scanned, *args))

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, *args))[..., 0])

    plain_loss, plain_grad = jax.value_and_grad(lambda p: loss(cls(plain_cfg), p))(params)
    scan_loss, scan_grad = jax.value_and_grad(lambda p: loss(scanned, p))(scanned_params)
    np.testing.assert_allclose(scan_loss, plain_loss, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(stack_layers(plain_grad, plain_grad)),
        jax.tree.leaves(scan_grad),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("unroll", [2, 3])
def test_scan_unroll_computes_what_one_layer_per_iteration_does(unroll):
    """model.scan_unroll: several layers per scan iteration (2 of 3 leaves a remainder), the same
    loss and gradients."""
    cfg = preset("tiny_gpt", num_decoder_layers=3, scan_layers=True)
    args = (tokens((2, 6)),)
    params = init(GPT(cfg), *args)

    def loss(model_cfg, p):
        return jnp.mean(jax.nn.log_softmax(GPT(model_cfg).apply({"params": p}, *args))[..., 0])

    expected, expected_grad = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    unrolled = dataclasses.replace(cfg, scan_unroll=unroll)
    value, grad = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
    np.testing.assert_allclose(value, expected, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=30, num_heads=4), "d_model"),
        (dict(activation="swish"), "activation"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(positions="rotary"), "positions"),
        (dict(dtype="float64"), "dtype"),
        (dict(dropout_rate=1.5), "dropout_rate"),
        (dict(num_decoder_layers=0), "num_decoder_layers"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=33, num_heads=3), "d_model"),  # sinusoids need an even width
        (dict(scan_unroll=0), "scan_unroll"),
        (dict(loss_impl="fast"), "loss_impl"),
        (dict(real_vocab_size=65), "real_vocab_size"),  # more real ids than embedding rows
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"model.{field}="):
        ModelConfig(**{**dataclasses.asdict(preset("tiny_transformer")), **overrides})


def test_unknown_field_and_preset_are_rejected():
    with pytest.raises(ConfigError, match="unknown model field.*d_modle"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt5")


def test_sequence_longer_than_max_len_is_a_clear_error():
    gpt = GPT(preset("tiny_gpt", max_len=8))
    with pytest.raises(ValueError, match="max_len=8"):
        gpt.init(jax.random.key(0), tokens((1, 9)))


def test_wrong_model_class_for_config():
    with pytest.raises(ValueError, match="num_encoder_layers"):
        GPT(preset("tiny_transformer")).init(jax.random.key(0), tokens((1, 4)))
