"""Conversations and prompt/completion pairs as training data: rendered as `transformers`'
`apply_chat_template` renders them, the loss on the answers only (checked by hand through
packing and accumulation), every file container, and bad records named or skipped."""

import gzip
import json

import jax
import numpy as np
import pytest
import zstandard
from conftest import run_python

from transformer.data.chat import DEFAULT_TEMPLATE, IM_END, IM_START, ChatFormat, ChatRenderer
from transformer.data.pipeline import make_data, prepare_corpus
from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError
from transformer.hf.tokenizer import export_tokenizer
from transformer.model.sharding import global_batch

from test_train_step import setup_for, tiny_config  # isort: skip

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATIONS = [
    [
        SYSTEM,
        {"role": "user", "content": "What does the cat say?"},
        {"role": "assistant", "content": "The cat says meow."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog says woof, loudly."},
    ],
    [
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Rhine."},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Backwards?"},
        {"role": "assistant", "content": "Three, two, one."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
]
# A template unlike the default: BOS first, the roles as text, the EOS ending every turn.
MODEL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_records(n):
    """n conversations about animals, some with a system turn, some multi-turn."""
    animals = ["cat", "dog", "cow", "owl", "duck", "frog", "lion", "bee"]
    sounds = ["meow", "woof", "moo", "hoot", "quack", "croak", "roar", "buzz"]
    records = []
    for i in range(n):
        a, s = animals[i % 8], sounds[i % 8]
        messages = [SYSTEM] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"What does the {a} say?"},
            {"role": "assistant", "content": f"The {a} says {s}."},
        ]
        if i % 2:
            messages += [
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": f"{s} {s}!"},
            ]
        records.append({"messages": messages})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def bpe_tokenizer():
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20
    return Tokenizer.train_bpe(texts, 300)


def runs(mask):
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


@pytest.mark.parametrize("which", ["default", "model", "model-own-end", "jinja-file"])
def test_chat_ids_equal_transformers_apply_chat_template(tmp_path, which):
    """default: ChatML added to a tokenizer; model: a directory's own template, the EOS ending
    each turn; model-own-end: ChatML in a directory whose EOS is another token (Qwen's and
    SmolLM2's base models: a turn ends with <|im_end|>, not the EOS); jinja-file: the template
    in chat_template.jinja, as transformers 5 saves it."""
    transformers = pytest.importorskip("transformers")
    tokenizer = bpe_tokenizer()
    if which == "default":
        chat = ChatFormat.default()
        tokenizer.add_special_tokens(chat.special_tokens())
        export_tokenizer(tokenizer, tmp_path, max_len=256, chat=chat)
    else:  # a pretrained model's directory with its own template
        template = MODEL_TEMPLATE
        if which == "model-own-end":
            tokenizer.add_special_tokens([IM_START, IM_END])
            template = DEFAULT_TEMPLATE
        export_tokenizer(tokenizer, tmp_path, max_len=256)
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        if which == "jinja-file":
            transformers.AutoTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "s")
            tmp_path = tmp_path / "s"
            assert (tmp_path / "chat_template.jinja").read_text() == MODEL_TEMPLATE
            assert "chat_template" not in json.loads(
                (tmp_path / "tokenizer_config.json").read_text()
            )
        chat = ChatFormat.from_model_dir(tmp_path)
        assert chat.template == template
        expected_end = IM_END if which == "model-own-end" else tokenizer.eos_token
        assert tokenizer.eos_token != IM_END and chat.end_of_turn == expected_end
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    renderer = ChatRenderer(chat)

    def apply(messages, **kwargs):
        out = theirs.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    for messages in CONVERSATIONS:
        ids, mask = renderer.encode(tokenizer, messages)
        assert list(ids) == apply(messages)
        assert renderer.prompt_ids(tokenizer, messages[:-1]) == apply(
            messages[:-1], add_generation_prompt=True
        )
        # The loss mask covers each answer and the token ending its turn, nothing else.
        answers = [tokenizer.hf.decode(ids[a:b], skip_special_tokens=False) for a, b in runs(mask)]
        assert answers == [
            m["content"] + chat.end_of_turn for m in messages if m["role"] == "assistant"
        ]


def test_masked_loss_equals_a_hand_computation_with_packing_and_accumulation(tmp_path):
    """The step's loss is the mean negative log-likelihood of the answer tokens only, each
    example scored alone (positions from 0, no attention to its row-mates)."""
    corpus = write_jsonl(tmp_path / "chats.jsonl", chat_records(40))
    data_cfg = dict(
        corpus=f"chat:{corpus}", tokenizer="char", seq_len=256, pack=True, cache_dir=str(tmp_path)
    )
    data = make_data(
        data_cfg, global_batch_size=8, seed=0, tokenizer_path=tmp_path / "tokenizer.json"
    )
    batch = next(data.train_iter)
    assert batch["segment_ids"].max() >= 3  # several conversations share a row
    tokenizer = data.tokenizer
    start, end = (tokenizer.hf.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assistant = tokenizer.encode("assistant\n")

    results = []
    for accum in (1, 2):
        config = tiny_config(grad_accum_steps=accum)
        config.model.max_len = 256
        config.data.seq_len = 256
        setup = setup_for(config, devices=jax.devices()[:1])
        with setup.within_mesh():
            state = setup.new_state(0)
            params = jax.device_get(state.params)  # the step donates the state
            _, metrics = setup.train_step(state, global_batch(batch, setup.mesh))
        results.append((float(metrics["loss_sum"]), float(metrics["tokens"])))

    nll, count = 0.0, 0
    for r in range(len(batch["tokens"])):
        segments = batch["segment_ids"][r]
        for s in range(1, segments.max() + 1):
            at = np.flatnonzero(segments == s)
            ids = batch["tokens"][r, at[0] : at[-1] + 2]  # the example: its inputs and one more
            if at[-1] + 1 < len(segments) and segments[at[-1] + 1] != 0:
                ids = ids[:-1]  # ... unless that one belongs to the next example
            logits = np.asarray(setup.task.model.apply({"params": params}, ids[None, :-1]))[0]
            logp = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
            # Answers by hand: after each "<|im_start|>assistant\n", up to and with <|im_end|>.
            wanted = np.zeros(len(ids), bool)
            for i in np.flatnonzero(ids == start):
                if list(ids[i + 1 : i + 1 + len(assistant)]) == assistant:
                    j = i + 1 + len(assistant)
                    while j < len(ids):
                        wanted[j] = True
                        if ids[j] == end:
                            break
                        j += 1
            targets = np.arange(1, len(ids))[wanted[1:]]
            nll -= sum(float(logp[t - 1, ids[t]]) for t in targets)
            count += len(targets)
    for loss_sum, tokens in results:
        assert tokens == count
        np.testing.assert_allclose(loss_sum / tokens, nll / count, rtol=1e-5)


def test_hosts_read_disjoint_rows_of_the_same_global_batch(tmp_path):
    """Two hosts' example batches, stacked, are the one-host batch: the masked loss, a sum over
    the global batch divided by its answer-token count, is the same on any number of hosts."""
    corpus = write_jsonl(tmp_path / "chats.jsonl", chat_records(40))
    cfg = dict(corpus=f"chat:{corpus}", tokenizer="char", seq_len=128, pack=True)
    cfg["cache_dir"] = str(tmp_path)

    def batches(index, count):
        data = make_data(
            cfg,
            global_batch_size=8,
            seed=3,
            tokenizer_path=tmp_path / "tokenizer.json",
            process_index=index,
            process_count=count,
        )
        train = [next(data.train_iter) for _ in range(3)]
        return train, list(data.eval_batches())

    one = batches(0, 1)
    hosts = [batches(i, 2) for i in range(2)]
    for split in (0, 1):
        for step, whole in enumerate(one[split]):
            for key, value in whole.items():
                parts = [host[split][step][key] for host in hosts]
                np.testing.assert_array_equal(np.concatenate(parts), value)


def instruct_records(n):
    return [{"prompt": f"Say {i} twice.", "completion": f"{i} {i}"} for i in range(n)]


def write_container(directory, kind, records):
    """The same records as JSON lines, gzip and zstandard JSON lines, parquet and a Hugging Face
    save_to_disk directory."""
    directory.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in records)
    if kind == "jsonl":
        (directory / "a.jsonl").write_text(text)
    elif kind == "jsonl.gz":
        with gzip.open(directory / "a.jsonl.gz", "wt") as f:
            f.write(text)
    elif kind == "jsonl.zst":
        (directory / "a.jsonl.zst").write_bytes(zstandard.compress(text.encode()))
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(records), directory / "a.parquet")
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(records).save_to_disk(str(directory / "saved"))
    return {
        "jsonl": "*.jsonl",
        "jsonl.gz": "*.jsonl.gz",
        "jsonl.zst": "*.jsonl.zst",
        "parquet": "*.parquet",
        "hf": "saved",
    }[kind]


def prepared_examples(cache, corpus):
    from transformer.data.shards import open_examples

    prepared = prepare_corpus(
        dict(corpus=corpus, tokenizer="char", seq_len=128, cache_dir=str(cache)),
        tokenizer_path=cache / "tokenizer.json",
    )
    out = []
    for split in ("train", "validation"):
        ids, masks, ends, _ = open_examples(prepared.report.directory, split)
        every = np.arange(ends[-1])
        out.append((np.asarray(ids[every]), np.asarray(masks[every]), ends))
    return out


def test_sharded_preparation_equals_one_run(tmp_path):
    """The masks are prepared as the ids are: N `prepare --shard I/N` commands write the same
    files as one, skipped records counted in their units."""
    from test_prepare import directory_files

    for i in range(6):
        records = chat_records(20)
        records.insert(i, {"messages": []})  # one bad record in each file
        write_jsonl(tmp_path / f"part{i}.jsonl", records)
    fields = dict(
        corpus=f"chat:{tmp_path}/part*.jsonl",
        tokenizer="char",
        seq_len=128,
        shard_mb=0.001,
        skip_bad_records=True,
    )
    one = prepare_corpus({**fields, "cache_dir": str(tmp_path / "one")})
    assert one.report.units_total >= 6
    for shard in range(3):
        three = prepare_corpus(
            {**fields, "cache_dir": str(tmp_path / "three")}, shard=shard, num_shards=3
        )
    assert directory_files(three.report.directory) == directory_files(one.report.directory)
    assert one.report.skipped_records == 6
    assert any(p.name.endswith(".mask.bin") for p in one.report.directory.iterdir())


@pytest.mark.parametrize("kind", ["chat", "instruct"])
def test_every_container_gives_the_same_examples(tmp_path, kind):
    records = chat_records(30) if kind == "chat" else instruct_records(30)
    containers = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf"]
    results = []
    for container in containers:
        name = write_container(tmp_path / container, container, records)
        prefix = "hf:" if container == "hf" else ""
        corpus = f"{kind}:{prefix}{tmp_path / container / name}"
        results.append(prepared_examples(tmp_path / f"cache-{container}", corpus))
    for other in results[1:]:
        for (ids, masks, ends), (ids0, masks0, ends0) in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(ids, ids0)
            np.testing.assert_array_equal(masks, masks0)
            np.testing.assert_array_equal(ends, ends0)
    (train_ids, train_masks, train_ends), (eval_ids, _, eval_ends) = results[0]
    assert len(train_ends) + len(eval_ends) == 30
    assert 0 < train_masks.sum() < len(train_ids)


BAD_RECORDS = {
    "missing field": ({"conversation": []}, "'messages' must be a non-empty list"),
    "unknown role": (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "unknown role 'robot'",
    ),
    "empty answer": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        "an empty assistant message",
    ),
    "too long": (
        {
            "messages": [
                {"role": "user", "content": "x" * 300},
                {"role": "assistant", "content": "ok"},
            ]
        },
        "no answer token within the first 129 tokens",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_RECORDS))
def test_a_bad_record_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, problem):
    bad, message = BAD_RECORDS[problem]
    records = chat_records(12)
    records.insert(6, bad)
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    cfg = dict(corpus=f"chat:{path}", tokenizer="char", seq_len=128, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"chats.jsonl:7: {message}") as caught:
        make_data(cfg, global_batch_size=4, seed=0, tokenizer_path=tmp_path / "a.json")
    assert "data.skip_bad_records=true" in str(caught.value)
    data = make_data(
        {**cfg, "skip_bad_records": True},
        global_batch_size=4,
        seed=0,
        tokenizer_path=tmp_path / "b.json",
    )
    assert data.skipped_records == 1


def test_training_on_a_bad_record_exits_with_one_line(tmp_path):
    records = chat_records(10)
    records.insert(3, {"prompt": "no messages here"})
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    result = run_python(
        "train.py",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.corpus=chat:{path}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.data.tokenizer=char",
        "--config.data.seq_len=128",
        "--config.model.max_len=128",
        check=False,
    )
    assert result.returncode == 2
    assert "chats.jsonl:4: 'messages' must be a non-empty list" in result.stderr
    assert "Traceback" not in result.stderr
