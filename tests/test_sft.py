"""Supervised fine-tuning with LoRA of a Llama-format Hugging Face directory on conversations,
then back to Hugging Face: merged weights `transformers` loads, and a PEFT adapter `peft` puts
onto the base model, both computing the run's logits; the base left bit for bit; resume exact;
`sample --chat` answering as `transformers`' greedy generation does."""

import json

import jax
import numpy as np
import pytest
from conftest import run_python, train

from transformer.data.chat import ChatFormat
from transformer.data.tokenizer import Tokenizer
from transformer.hf import config_from_hf, load_hf
from transformer.hf.runs import write_peft_adapter
from transformer.hf.tokenizer import export_tokenizer
from transformer.model import GPT, lora
from transformer.store.rundir import RunDir

from test_chat_data import chat_records, write_jsonl  # isort: skip

HF_EXTRA = "Hugging Face interop needs the hf extra: pip install torch && pip install -e '.[hf]'"
transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
torch = pytest.importorskip("torch", reason=HF_EXTRA)
peft = pytest.importorskip("peft", reason=HF_EXTRA)

SFT_CONFIG = "configs/sft_lora.py"
TARGETS = "q,k,v,o,gate,up,down"
PROMPT = [{"role": "user", "content": "What does the owl say?"}]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small Llama (grouped-query attention, SwiGLU, RoPE) in Hugging Face's format, with a
    BPE tokenizer and a ChatML chat template in its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("llama")
    texts = [m["content"] for r in chat_records(64) for m in r["messages"]] * 10
    tokenizer = Tokenizer.train_bpe(texts, 320)
    chat = ChatFormat.default()
    tokenizer.add_special_tokens(chat.special_tokens())
    export_tokenizer(tokenizer, directory, max_len=128, chat=chat)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.hf.token_to_id(chat.end_of_turn),
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def sft_flags(base_dir, corpus, cache):
    fields = config_from_hf(json.loads((base_dir / "config.json").read_text())).to_dict()
    model = {k: v for k, v in fields.items() if k not in ("vocab_size", "real_vocab_size")}
    model.update(dtype="float32", param_dtype="float32", lora_rank=4, lora_targets=TARGETS)
    return [
        *(f"--config.model.{k}={v}" for k, v in model.items()),
        "--config.model.lora_dropout=0.1",
        f"--config.checkpoint.init_from={base_dir}",
        f"--config.data.tokenizer_path={base_dir}/tokenizer.json",
        f"--config.data.corpus=chat:{corpus}",
        f"--config.data.cache_dir={cache}",
        "--config.data.seq_len=64",
        "--config.train.batch_size=8",
        "--config.train.learning_rate=1e-2",
        "--config.train.warmup_steps=0",
        "--config.train.eval_every_steps=3",
        "--config.train.eval_batches=1",
        "--config.train.log_every_steps=1",
        "--config.train.sample_tokens=0",
        "--config.checkpoint.every_steps=3",
    ]


@pytest.fixture(scope="module")
def sft_run(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    corpus = write_jsonl(root / "chats.jsonl", chat_records(64))
    flags = sft_flags(base_dir, corpus, root / "cache")
    train(root / "run", *flags, "--config.train.num_steps=6", config=SFT_CONFIG)
    return root, flags


def run_logits(workdir, tokens):
    cfg, params, _ = RunDir(workdir).load()
    return np.asarray(GPT(cfg).apply({"params": params}, tokens))[..., : cfg.num_classes]


def tokens_for(base_dir):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    ids = hf_tokenizer.apply_chat_template(chat_records(2)[1]["messages"], tokenize=True)
    return np.asarray([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_only_the_adapters_trained_and_the_base_is_bit_identical(base_dir, sft_run):
    root, _ = sft_run
    cfg, params, _ = RunDir(root / "run").load()
    _, imported = load_hf(base_dir, pad_vocab_to=cfg.vocab_size)
    trainable, frozen = lora.split_trainable(jax.device_get(params))
    flat_frozen = dict(jax.tree_util.tree_leaves_with_path(frozen))
    flat_imported = dict(jax.tree_util.tree_leaves_with_path(imported))
    assert flat_frozen.keys() == flat_imported.keys()
    for path, value in flat_imported.items():
        np.testing.assert_array_equal(flat_frozen[path], value, err_msg=str(path))
    b = [x for p, x in jax.tree_util.tree_leaves_with_path(trainable) if "lora_b" in str(p)]
    # query, key_value, out, wi_gate, wi_up, wo in each of 2 layers: all trained.
    assert len(b) == 2 * 6 and all(np.abs(x).max() > 0 for x in b)
    metrics = RunDir(root / "run").read_metrics()
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0]


def test_merged_export_is_a_hugging_face_model_with_the_runs_logits(base_dir, sft_run):
    root, _ = sft_run
    out = root / "merged"
    run_python("-m", "transformer.export", f"--workdir={root / 'run'}", f"--out={out}", check=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = tokens_for(base_dir)
    np.testing.assert_allclose(
        torch_logits(model, tokens), run_logits(root / "run", tokens), atol=1e-4
    )
    # The tokenizer files and chat template travel with it: the same ids as the base model's.
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == ChatFormat.default().template
    np.testing.assert_array_equal(tokens_for(out), tokens)
    assert exported.eos_token == "<|im_end|>" and model.config.eos_token_id == exported.eos_token_id

    # `sample --chat` answers as transformers' greedy generation of the exported model does.
    sampled = run_python(
        "-m",
        "transformer.sample",
        f"--workdir={root / 'run'}",
        "--chat",
        f"--prompt={PROMPT[0]['content']}",
        "--temperature=0",
        "--max_new_tokens=12",
        check=True,
    ).stdout
    prompt = exported.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    generated = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    expected = exported.decode(generated, skip_special_tokens=True)
    assert sampled.rstrip("\n") == expected


def test_export_onto_a_file_is_one_clear_error_and_leaves_it(sft_run):
    root, _ = sft_run
    target = root / "notes.txt"
    target.write_text("mine")
    proc = run_python("-m", "transformer.export", f"--workdir={root / 'run'}", f"--out={target}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"transformer.export: error: {target} is a file; give the directory to export into (--out)"
    ]
    assert target.read_text() == "mine"


def test_peft_adapter_on_the_base_model_gives_the_runs_logits(base_dir, sft_run):
    root, _ = sft_run
    out = root / "adapter"
    run_python(
        "-m",
        "transformer.export",
        f"--workdir={root / 'run'}",
        f"--out={out}",
        "--adapter",
        check=True,
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokens = tokens_for(base_dir)
    before = torch_logits(base, tokens)
    model = peft.PeftModel.from_pretrained(base, out)
    after = torch_logits(model, tokens)
    np.testing.assert_allclose(after, run_logits(root / "run", tokens), atol=1e-4)
    assert np.abs(after - before).max() > 1e-3  # the adapters are there, and they matter


def test_a_resumed_lora_run_equals_an_uninterrupted_one(sft_run):
    root, flags = sft_run
    stop = "--config.train.stop_at_step=3"  # as a preemption would: same schedule
    train(root / "resumed", *flags, "--config.train.num_steps=6", stop, config=SFT_CONFIG)
    train(root / "resumed", *flags, "--config.train.num_steps=6", config=SFT_CONFIG)
    _, straight, _ = RunDir(root / "run").load()
    _, resumed, _ = RunDir(root / "resumed").load()
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)

    def losses(workdir):
        keys = ("step", "train_loss", "grad_norm", "val_loss")
        return [{k: m[k] for k in keys if k in m} for m in RunDir(workdir).read_metrics()]

    assert losses(root / "resumed") == losses(root / "run")  # bit for bit, validation too


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("targets", ["qkv,o,up,down", "qkv", "o"])
def test_gpt2_adapters_load_in_peft_with_our_logits(gpt2_dir, tmp_path, targets):
    """GPT-2 keeps queries, keys and values in one Conv1D (c_attn, weights [in, out]) and names
    two modules of a layer c_proj: the adapter lands on exactly the adapted ones."""
    import dataclasses

    cfg, imported = load_hf(gpt2_dir)
    cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 16))
    fresh = GPT(cfg).init(jax.random.key(0), tokens)["params"]
    adapters, _ = lora.split_trainable(jax.device_get(fresh))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32), adapters)
    params = lora.join(adapters, imported)
    write_peft_adapter(cfg, params, tmp_path, base_model=str(gpt2_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path)
    ours = np.asarray(GPT(cfg).apply({"params": params}, tokens))
    np.testing.assert_allclose(torch_logits(model, tokens), ours, atol=1e-4)


def test_gpt2_per_slot_adapters_are_refused_as_a_peft_adapter(gpt2_dir, tmp_path):
    import dataclasses

    from transformer.errors import ConvertError

    cfg, imported = load_hf(gpt2_dir)
    cfg = dataclasses.replace(cfg, lora_rank=4, lora_targets="q,v")
    params = GPT(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    with pytest.raises(ConvertError, match="lora_targets with qkv"):
        write_peft_adapter(cfg, jax.device_get(params), tmp_path, base_model=str(gpt2_dir))
