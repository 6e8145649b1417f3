"""Cached decoding equals the full forward pass, for both models, prompts of several lengths and
a batch whose rows have different prompt lengths (left-padded)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import GPT, EncoderDecoder, preset
from transformer.inference.encoder_decoder import encdec_init_cache, encdec_tokens_to_logits
from transformer.inference.gpt import gpt_init_cache, gpt_tokens_to_logits


def random_tokens(shape, seed):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 3, 64, dtype=jnp.int32))


@pytest.mark.parametrize(
    "name, scan",
    [("tiny_gpt", False), ("tiny_gpt", True), ("llama_tiny", False), ("llama_tiny", True)],
)
def test_gpt_cached_logits_equal_full_forward(name, scan):
    """llama_tiny: rotary positions offset by the cache index, 2 kv heads for 4 query heads."""
    cfg = preset(name, scan_layers=scan)
    model = GPT(cfg)
    total = 12
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, total), jnp.int32))["params"]
    )
    forward = jax.jit(model.apply)
    lengths = [1, 3, 6]  # prompt lengths of the three rows
    seqs = [random_tokens((total,), seed) for seed in range(3)]
    prompt_len = max(lengths)
    steps = total - prompt_len
    # Left-pad each prompt to the longest.
    prompt = np.zeros((3, prompt_len), np.int32)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        prompt[row, prompt_len - n :] = seq[:n]
    offset = jnp.asarray([prompt_len - n for n in lengths])
    cache = gpt_init_cache(cfg, 3, prompt_len + steps, offset)
    step_fn = jax.jit(gpt_tokens_to_logits(cfg, params))
    logits, cache = step_fn(jnp.asarray(prompt), cache)  # prefill: one call
    collected = [[logits[row, prompt_len - 1]] for row in range(3)]
    for i in range(steps):
        # Feed each row its own next true token (teacher forcing through the cache).
        nxt = jnp.asarray([[seqs[row][lengths[row] + i]] for row in range(3)])
        logits, cache = step_fn(nxt, cache)
        for row in range(3):
            collected[row].append(logits[row, 0])
    for row in range(3):
        n = lengths[row]
        full = forward({"params": params}, jnp.asarray(seqs[row][None, : n + steps]))[0]
        expected = full[n - 1 : n + steps]
        np.testing.assert_allclose(np.stack(collected[row]), expected, atol=1e-5)
        # The prefill's logits over the row's real prompt tokens match too.
    np.testing.assert_allclose(
        step_fn(jnp.asarray(prompt), gpt_init_cache(cfg, 3, prompt_len + steps, offset))[0][2],
        forward({"params": params}, jnp.asarray(seqs[2][None, :6]))[0],
        atol=1e-5,
    )


# Scanned layers' caches are covered by the GPT cases above; the scanned encoder-decoder is slow.
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_encoder_decoder_cached_logits_equal_full_forward(scan):
    cfg = preset("tiny_transformer", scan_layers=scan)
    model = EncoderDecoder(cfg)
    src = jnp.asarray(random_tokens((2, 7), 10))
    src_seg = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])  # second source is padded
    tgt = jnp.asarray(random_tokens((2, 9), 11)).at[:, 0].set(1)  # BOS first
    params = nn.meta.unbox(model.init(jax.random.key(0), src, tgt)["params"])
    full = model.apply({"params": params}, src, tgt, src_segment_ids=src_seg)
    cache = encdec_init_cache(cfg, params, src, src_seg, length=9, bos_id=1)
    step_fn = jax.jit(encdec_tokens_to_logits(cfg, params))
    # Prefill two tokens at once, then one token per step.
    logits, cache = step_fn(tgt[:, :2], cache)
    pieces = [logits]
    for i in range(2, 9):
        logits, cache = step_fn(tgt[:, i : i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_vocabulary_padding_is_never_predicted():
    cfg = preset("tiny_gpt", real_vocab_size=50)
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    cache = gpt_init_cache(cfg, 1, 4, jnp.zeros((1,), jnp.int32))
    logits, _ = gpt_tokens_to_logits(cfg, params)(jnp.ones((1, 4), jnp.int32), cache)
    assert int(jnp.argmax(logits[0, -1])) < 50
    assert float(logits[..., 50:].max()) == float(jnp.finfo(jnp.float32).min)


@pytest.mark.slow
def test_generation_past_the_context_slides_by_half_a_context():
    """`generate` beyond `max_len`: once the longest context in the batch is full, every row
    continues from its last max_len // 2 tokens. The reference recomputes the full forward
    pass of each row for every token and takes the argmax."""
    from transformer.data.tokenizer import Tokenizer
    from transformer.errors import ConfigError
    from transformer.inference import generate

    tokenizer = Tokenizer.train_char(["abcdefgh ij\n"])
    cfg = preset("tiny_gpt", max_len=16, vocab_size=64, real_vocab_size=tokenizer.vocab_size)
    model = GPT(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda p: p * 4, params)  # sharper logits: no near-ties in argmax

    def reference(prompts, new_tokens):
        contexts = [tokenizer.encode(p) for p in prompts]
        outputs = [[] for _ in prompts]
        while len(outputs[0]) < new_tokens:
            steps = cfg.max_len - max(len(c) for c in contexts)  # the batch's window
            for row, context in enumerate(contexts):
                for _ in range(steps):
                    logits = model.apply({"params": params}, jnp.asarray([context]))[0, -1]
                    context = context + [int(jnp.argmax(logits[: tokenizer.vocab_size]))]
                    outputs[row].append(context[-1])
                contexts[row] = context[-(cfg.max_len // 2) :]
        return [tokenizer.decode(out[:new_tokens]) for out in outputs]

    kwargs = dict(temperature=0.0, stop_at_eos=False)
    # 40 new tokens after a 3-token prompt: windows of 13, 8, 8, 8 and 3 of 8.
    assert generate(cfg, params, tokenizer, ["abc"], max_new_tokens=40, **kwargs) == reference(
        ["abc"], 40
    )
    prompts = ["abc", "hij ab"]  # left-padded into one batch
    assert generate(cfg, params, tokenizer, prompts, max_new_tokens=30, **kwargs) == reference(
        prompts, 30
    )
    with pytest.raises(ConfigError, match="prompt \\(16 tokens\\) leaves no room"):
        generate(cfg, params, tokenizer, ["a" * 16], max_new_tokens=1)
