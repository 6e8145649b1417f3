"""Fine-tuning: a run initialised from Hugging Face GPT-2 weights or from another run."""

import json

import numpy as np
import pytest
from conftest import read_metrics, run_python
from conftest import train as shared_train

HF_EXTRA = "GPT-2 interop needs the hf extra: pip install torch && pip install -e '.[hf]'"

transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
pytest.importorskip("torch", reason=HF_EXTRA)


def write_gpt2_vocab(directory):
    """A GPT-2-shaped vocabulary: the 256 byte symbols, a few merges, <|endoftext|> last."""
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    return len(vocab)


def train(workdir, *overrides):
    return shared_train(workdir, "--config.train.sample_tokens=0", *overrides)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    vocab_size = write_gpt2_vocab(directory)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory / "hf")
    return directory


GPT2_FLAGS = [
    "--config.model.d_model=64",
    "--config.model.d_ff=256",
    "--config.model.max_len=32",
    "--config.data.tokenizer=gpt2",
]


def test_initial_parameters_are_the_imported_ones(hf_checkpoint):
    from transformer.hf import load_hf
    from transformer.train.config import RunConfig, base_config
    from transformer.train.finetune import initial_params

    config = base_config()
    config.model.update(
        d_model=64,
        d_ff=256,
        max_len=32,
        num_heads=4,
        num_encoder_layers=0,
        num_decoder_layers=2,
        activation="gelu",
        norm_position="pre",
        norm_epsilon=1e-5,
        positions="learned",
        scale_embeddings=False,
    )
    config.train.batch_size = 8
    config.data.seq_len = 32
    import jax

    for scan in (False, True):
        config.model.scan_layers = scan
        model_cfg = RunConfig.from_any(config).model_config(263)
        params = initial_params(str(hf_checkpoint / "hf"), model_cfg)
        _, expected = load_hf(str(hf_checkpoint / "hf"), pad_vocab_to=320, scan_layers=scan)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_finetune_resume_and_sample(hf_checkpoint, tmp_path):
    workdir = str(tmp_path / "ft")
    flags = [
        *GPT2_FLAGS,
        f"--config.data.gpt2_vocab={hf_checkpoint}",
        f"--config.checkpoint.init_from={hf_checkpoint / 'hf'}",
    ]
    train(workdir, *flags, "--config.train.stop_at_step=10")
    train(workdir, *flags)  # resumes from its own checkpoint, not from init_from again
    steps = [record["step"] for record in read_metrics(workdir)]
    assert steps == [5, 10, 15, 20]
    proc = run_python(
        "-m", "transformer.sample", f"--workdir={workdir}", "--prompt=the", "--max_new_tokens=5"
    )
    assert proc.returncode == 0 and proc.stdout.startswith("the"), proc.stderr[-2000:]

    # Another run can start from this one's checkpoint; a different model is refused.
    second = str(tmp_path / "second")
    train(
        second,
        *GPT2_FLAGS,
        f"--config.data.gpt2_vocab={hf_checkpoint}",
        f"--config.checkpoint.init_from={workdir}",
        "--config.train.num_steps=5",
    )
    proc = shared_train(
        tmp_path / "bad",
        *GPT2_FLAGS,
        "--config.model.num_decoder_layers=3",
        f"--config.data.gpt2_vocab={hf_checkpoint}",
        f"--config.checkpoint.init_from={workdir}",
        check=False,
    )
    assert proc.returncode == 2
    assert "model.num_decoder_layers: 2 there, 3 here" in proc.stderr


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A Hugging Face Llama directory as open models ship: config.json, model.safetensors and
    the model's own tokenizer.json (byte-level BPE with Llama 3's BOS/EOS tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("llama")
    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf_tokenizer.train_from_iterator(["the king and the queen of the night"] * 50, trainer)
    hf_tokenizer.save(str(directory / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=hf_tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


LLAMA_FLAGS = [
    *(
        f"--config.model.{k}={v}"
        for k, v in dict(
            d_model=64,
            d_ff=128,
            num_heads=4,
            num_kv_heads=2,
            max_len=32,
            positions="rope",
            activation="swiglu",
            norm_type="rmsnorm",
            norm_epsilon=1e-5,
            use_bias=False,
            tie_embeddings=False,
        ).items()
    ),  # fmt: skip
    "--config.data.tokenizer=hf",
]


@pytest.mark.slow
def test_llama_directory_finetunes_with_its_tokenizer_and_samples(llama_checkpoint, tmp_path):
    from transformer.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(llama_checkpoint)
    assert (tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id) == ("hf", 0, 1)
    workdir = str(tmp_path / "ft")
    train(
        workdir,
        *LLAMA_FLAGS,
        f"--config.data.tokenizer_path={llama_checkpoint}",
        f"--config.checkpoint.init_from={llama_checkpoint}",
        "--config.train.num_steps=5",
    )
    first = read_metrics(workdir)[0]
    assert first["step"] == 5 and np.isfinite(first["train_loss"])
    proc = run_python(
        "-m",
        "transformer.sample",
        f"--workdir={workdir}",
        "--prompt=the king",
        "--max_new_tokens=5",
    )
    assert proc.returncode == 0 and proc.stdout.startswith("the king"), proc.stderr[-2000:]
    # The run's tokenizer is the model's own.
    assert Tokenizer.load(workdir).to_json() == tokenizer.to_json()
