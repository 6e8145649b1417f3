"""Conversations as token ids with a loss mask: chat templates rendered as `transformers`
renders them, and the tokens of every assistant turn marked as the ones to learn.

A chat format is a Jinja template plus the special tokens it may name (`bos_token`,
`eos_token`, ...) and the token that ends an assistant turn. A pretrained model's own format is
read from its `tokenizer_config.json` or `chat_template.jinja` (`ChatFormat.from_model_dir`),
its end of turn being the special token the template writes after an answer (ChatML's
`<|im_end|>`, Llama 3's `<|eot_id|>`, else the EOS); otherwise the documented default is
ChatML:

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello.<|im_end|>

whose `<|im_start|>` and `<|im_end|>` are added to the tokenizer as special tokens.

Rendering follows `transformers`' `apply_chat_template` (a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, its `tojson`, `raise_exception` and `strftime_now`, the special
tokens as variables; the text then tokenised with special tokens recognised and none added), so
the ids are the ones `apply_chat_template` gives. The loss mask marks each assistant turn: the
text between the rendering of the turns before it with a generation prompt and the rendering
through it, i.e. the answer and its end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError

CHAT_FILE = "chat.json"  # a run's chat format, beside its tokenizer.json
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_PROBE = "PROBE-ANSWER-7F3A"  # an answer no template writes itself, to see what follows one


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A chat template, the special tokens it may name, and the token ending a turn."""

    template: str
    tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    end_of_turn: str  # ends an assistant turn; generation stops there

    @classmethod
    def default(cls) -> ChatFormat:
        return cls(DEFAULT_TEMPLATE, {}, IM_END)

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike) -> ChatFormat | None:
        """The format of a model directory: the `chat_template` of its tokenizer_config.json,
        or its chat_template.jinja (where `transformers` 5 saves it); None without one."""
        directory = Path(directory).expanduser()
        path = directory / "tokenizer_config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template}
            if "default" not in named:
                raise DataError(
                    f"{path} has named chat templates ({', '.join(map(str, named))}) but none "
                    "named 'default'; name the one to train with 'default'"
                )
            template = named["default"]
        if not template and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if not template:
            return None
        tokens = {k: _content(config[k]) for k in _TOKEN_KEYS if config.get(k)}
        if "eos_token" not in tokens:
            raise DataError(f"{path} has a chat_template but no eos_token to end a turn with")
        specials = _special_tokens(directory, config) | set(tokens.values())
        return cls(template, tokens, _end_of_turn(cls(template, tokens, ""), specials))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> ChatFormat:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def special_tokens(self) -> list[str]:
        """Tokens the tokenizer must know as special: the default template's markers."""
        return [IM_START, IM_END] if self.template == DEFAULT_TEMPLATE else []


def _content(token: Any) -> str:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)


def _special_tokens(directory: Path, config: dict) -> set[str]:
    """The special tokens a model directory declares (tokenizer.json's added tokens and
    tokenizer_config.json's `added_tokens_decoder`)."""
    entries = list(config.get("added_tokens_decoder", {}).values())
    if (directory / "tokenizer.json").is_file():
        tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        entries += tokenizer.get("added_tokens") or []
    return {e["content"] for e in entries if isinstance(e, dict) and e.get("special")}


def _end_of_turn(chat: ChatFormat, specials: set[str]) -> str:
    """The special token `chat`'s template writes first after an assistant's answer (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), else the EOS."""
    eos = chat.tokens["eos_token"]
    conversation = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE}]
    try:
        text = ChatRenderer(chat).render(conversation)
    except DataError:  # a template with demands of its own: the EOS
        return eos
    at = text.rfind(_PROBE)
    tail = text[at + len(_PROBE) :] if at >= 0 else ""
    found = [(tail.find(t), -len(t), t) for t in specials if t and t in tail]
    return min(found)[2] if found else eos


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant tracker) rendered as its
    body: the loss mask here comes from rendering prefixes instead."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class ChatRenderer:
    """Renders conversations in a `ChatFormat` and tokenises them with a loss mask."""

    def __init__(self, chat: ChatFormat):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(chat.template)
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template does not compile: {e}") from None
        self.chat = chat

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.chat.tokens
            )
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template refused the conversation: {e}") from None

    def answer_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn: from the
        end of the generation prompt through the turn's end-of-turn token (what the template
        writes after that, such as a newline, is context)."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (text.startswith(start) and text.startswith(through)):
                raise DataError(
                    "the chat template renders the first turns of a conversation differently "
                    "from the whole conversation, so the answers cannot be told apart; use a "
                    "template whose rendering of earlier turns is a prefix of later ones"
                )
            eot = self.chat.end_of_turn
            end = text.rfind(eot, len(start), len(through))
            spans.append((len(start), len(through) if end < 0 else end + len(eot)))
        return text, spans

    def encode(self, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[Any, Any]:
        """(ids int64 [n], loss mask uint8 [n]): 1 on every token of an assistant turn (its end
        token included), 0 on the rest."""
        text, spans = self.answer_spans(messages)
        encoding = tokenizer.encode_rendered(text)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)  # [n, (start, end)]
        mask = np.zeros(len(offsets), bool)
        for begin, stop in spans:  # a token overlapping an answer's characters is a target
            mask |= (offsets[:, 0] < stop) & (offsets[:, 1] > begin)
        return np.asarray(encoding.ids, np.int64), mask.astype(np.uint8)

    def prompt_ids(self, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a conversation followed by the prompt for the assistant's next turn."""
        return tokenizer.encode_rendered(self.render(messages, add_generation_prompt=True)).ids


def check_messages(messages: Any) -> str | None:
    """Why a record's messages are not a conversation to learn from, or None if they are."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "every message needs a 'role' and a string 'content'"
        if message.get("role") not in ROLES:
            return f"unknown role {message.get('role')!r} (roles: {', '.join(ROLES)})"
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no assistant message to learn from"
    if any(not m["content"].strip() for m in answers):
        return "an empty assistant message"
    return None


def conversation(record: Any, kind: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, None) from a chat record ({"messages": [...]}) or an instruct record
    ({"prompt", "completion"}: a user turn and the answer), or (None, why not)."""
    if not isinstance(record, dict):
        return None, "a record must be a JSON object"
    if kind == "instruct":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, "an instruct record needs string 'prompt' and 'completion' fields"
        record = {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
        }
    messages = record.get("messages")
    why = check_messages(messages)
    if why:
        return None, why
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


@dataclasses.dataclass
class ExampleEncoder:
    """A record of a chat or instruct corpus -> (ids, loss mask) for `shards.prepare_shards`,
    or None for a bad record when `skip_bad` (data.skip_bad_records); otherwise a bad record is
    a DataError naming where it is. Bad: not a conversation (`conversation`), refused by the
    template, or with no answer token within the first `max_tokens` (data.seq_len + 1)."""

    renderer: ChatRenderer
    tokenizer: Tokenizer
    max_tokens: int
    skip_bad: bool

    def __call__(self, where: str, record: Any, kind: str) -> tuple[Any, Any] | None:
        messages, why = conversation(record, kind)
        if messages is not None:
            try:
                ids, mask = self.renderer.encode(self.tokenizer, messages)
            except DataError as e:
                why = str(e)
            else:
                if mask[1 : self.max_tokens].any():
                    return ids, mask
                why = (
                    f"no answer token within the first {self.max_tokens} tokens (data.seq_len "
                    "+ 1); raise data.seq_len or shorten the conversation"
                )
        if self.skip_bad:
            return None
        raise DataError(
            f"{where}: {why}; fix the record, or set data.skip_bad_records=true to skip "
            "(and count) such records"
        )
