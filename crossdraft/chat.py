"""Chat templates: a conversation -> the prompt text a chat model expects.

Owns: checking a conversation in the OpenAI shape (a list of messages, each a `role` and a `content`
that is a string or a list of text parts; an optional `name`), and rendering it with the target
tokenizer's own chat template (the Jinja template of its tokenizer files, as Hugging Face's
`apply_chat_template` renders it) followed by the prompt of the assistant's turn. When the template
writes the BOS token itself and the target's encoder also puts one first (`Vocab.prompt_bos`), the
template's is dropped, so that a prompt never starts with two.

Never: tokenizes for the model, loads files, imports grpc.
"""
from __future__ import annotations

from .errors import FailedPrecondition, InvalidArgument

MAX_MESSAGES = 4096


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages) -> list:
    """OpenAI-style messages -> [{"role", "content"[, "name"]}] with string contents; InvalidArgument
    (its message names the field) for anything else."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object with a role and a content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"messages[{i}].role must be a non-empty string")
        msg = {"role": role, "content": _content(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", "
                                      f"\"text\": ...}}) are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts")


def render(tokenizer, messages, model: str = "", bos_in_prompt: bool = False) -> str:
    """The prompt text of `messages` for a model whose tokenizer is `tokenizer` (a Hugging Face
    tokenizer), ending with the start of the assistant's turn. FailedPrecondition when the model has
    no chat template; InvalidArgument when the messages are malformed or the template refuses them."""
    msgs = check_messages(messages)
    if not has_template(tokenizer):
        raise FailedPrecondition(f"model {model!r} has no chat template in its tokenizer files: use /v1/completions "
                                 "with a prompt formatted for it")
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception(), or one it cannot render
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgument(f"the chat template of model {model!r} refused the messages: {first}") from None
    if not isinstance(text, str):
        raise InvalidArgument(f"the chat template of model {model!r} did not render text")
    bos = getattr(tokenizer, "bos_token", None)
    if bos_in_prompt and bos and text.startswith(bos):
        text = text[len(bos):]
    return text
