"""The conversation format: the one home of chat messages, role markers and the chat template.

    from lmpipe.chat import prompt_text
    text = prompt_text(tokenizer, [{"role": "user", "content": "Is this review positive or negative?"}])
    # -> "<|user|>Is this review positive or negative?</s><|assistant|>" with the pipeline's own tokenizer

Every prompt the pipeline builds goes through `tokenizer.apply_chat_template` (transformers' own home of the
chat format): generative fine-tuning (lmpipe/sft.py), evaluate, `lmpipe generate` and serving call
`prompt_text` / `conversation_text` here. The pipeline's own tokenizer (tokenize.chat_tokens: true) gets
ROLE_TOKENS as special tokens appended after its trained vocabulary (existing ids unchanged) and CHAT_TEMPLATE,
saved with it (chat_template.jinja); a checkpoint's tokenizer keeps its own template.
"""

from __future__ import annotations

import json
import string
from typing import Any

from lmpipe.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
"""Special tokens marking the start of a turn; a turn ends with the tokenizer's EOS (where generation stops)."""

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
"""Jinja: `<|role|>content</s>` per turn, then `<|assistant|>` when a reply is asked for. No BOS: the prompt
encoding (lmpipe.generation.encode_prompt) puts it in front, as pretraining saw a document start."""

TEMPLATE_FIELDS = ("text", "label")
"""What a task template (clean.sft.templates) can name: the example's text and its label word (label_names)."""

Messages = list[dict[str, str]]


# -- the tokenizer side ---------------------------------------------------------------------------------------

def add_chat_format(tokenizer) -> int:
    """Give the pipeline's own tokenizer the role markers (appended after its vocabulary, so every existing id
    stays what it was) and CHAT_TEMPLATE. Returns the number of tokens added."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


def check_tokenizer(tokenizer, where: str) -> None:
    """A tokenizer that cannot format conversations is refused in one line."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: the tokenizer has no chat template; for the pipeline's own tokenizer set "
                          "tokenize.chat_tokens: true (and re-run tokenize + pretrain), or use a checkpoint whose "
                          "tokenizer has one")


def prompt_text(tokenizer, messages: Messages) -> str:
    """The text a model continues to answer `messages` (the conversation so far, ending with a user turn):
    the chat template with its generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def conversation_text(tokenizer, messages: Messages) -> str:
    """A whole conversation as training sees it (every turn closed, no generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


# -- records --------------------------------------------------------------------------------------------------

def check_messages(messages: Any, where: str) -> Messages:
    """A chat record's `messages`, validated: a list of {role, content} turns, roles system (first only), user,
    assistant, string contents, at least one assistant turn. A bad one is one DataError line naming `where`
    (file:line)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: messages[{i}] is not an object with role and content")
        extra = sorted(set(turn) - {"role", "content"})
        if extra:
            raise DataError(f"{where}: messages[{i}]: unknown key {extra[0]!r} (a turn has role and content)")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}]: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if role == "system" and i > 0:
            raise DataError(f"{where}: messages[{i}]: a system turn can only come first")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}]: content must be a string (got {type(content).__name__})")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return out


def record_messages(record: Any, where: str) -> Messages:
    """One record of a clean.sft source: {"messages": [...]} or {"prompt": ..., "response": ...} (optional
    "system") -> its messages, validated."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be an object with messages, or prompt and response")
    if "messages" in record:
        return check_messages(record["messages"], where)
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise DataError(f"{where}: no messages and no {' or '.join(missing)} (a record has messages, or prompt and "
                        "response)")
    turns = ([{"role": "system", "content": record["system"]}] if record.get("system") is not None else []) + \
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return check_messages(turns, where)


def dumps(messages: Messages) -> str:
    """How a conversation is stored in the clean parquet files (one JSON string per row)."""
    return json.dumps(messages, ensure_ascii=False)


def loads(text: str) -> Messages:
    return json.loads(text)


def prompt_and_answer(messages: Messages) -> tuple[Messages, str]:
    """The conversation up to its last assistant turn, and that turn's content (what evaluation asks and
    expects)."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# -- task templates ---------------------------------------------------------------------------------------------

def template_fields(template: str) -> list[str]:
    """The field names a str.format template uses ("Review: {text}" -> ["text"]); ValueError when malformed."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def template_issues(name: str, prompt: str, response: str, system: str | None) -> list[str]:
    """One line per problem of the task template clean.sft.templates.<name> (relative to the section: lines
    start at `templates.`): malformed, or naming a field that is not there."""
    issues = []
    for part, template in (("prompt", prompt), ("response", response), ("system", system)):
        if template is None:
            continue
        where = f"templates.{name}.{part}"
        try:
            fields = template_fields(template)
        except ValueError as e:
            issues.append(f"{where}: not a format template ({e})")
            continue
        for field in fields:
            if field not in TEMPLATE_FIELDS:
                issues.append(f"{where}: unknown field {{{field}}} (fields: "
                              + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS) + ")")
    return issues


def task_messages(prompt: str, response: str, system: str | None, text: str, label: str) -> Messages:
    """One labelled example as a conversation: the templates filled with its text and label word."""
    values = {"text": text, "label": label}
    turns = [{"role": "system", "content": system.format(**values)}] if system else []
    return turns + [{"role": "user", "content": prompt.format(**values)},
                    {"role": "assistant", "content": response.format(**values)}]
