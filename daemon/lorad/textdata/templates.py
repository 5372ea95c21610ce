"""Chat templates: the tokenizer's own, or one lorad names, and where the responses sit in the text.

Training and use must format a conversation the same way, so the template chosen here is set on the
run's tokenizer and saved with the adapter. Response spans are found by rendering the conversation
prefix by prefix (``text(messages[:i]) + generation prompt`` is where reply ``i`` starts), never by
searching for strings in the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorad.textdata.shapes import Message

# Jinja templates in the form transformers' `apply_chat_template` runs. Each ends an assistant turn
# with the tokenizer's EOS, so a model trained with it learns to stop.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
        "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
TEMPLATE_CHOICES = ("tokenizer", *NAMED_TEMPLATES)


class TemplateError(ValueError):
    """The template cannot render a conversation in a way spans can be computed from."""


@dataclass(frozen=True)
class RenderedChat:
    """A conversation as text, with the [start, end) character spans the loss covers."""

    text: str
    response_spans: tuple[tuple[int, int], ...]


def resolve_template(choice: str, tokenizer_template: str | None) -> str:
    """The Jinja text for ``chat_template`` (a named template, ``tokenizer``, or Jinja itself)."""
    if choice == "tokenizer":
        if not tokenizer_template:
            raise TemplateError("the tokenizer has no chat template")
        return tokenizer_template
    return NAMED_TEMPLATES.get(choice, choice)


def render_chat(tokenizer: object, messages: Sequence[Message], eos_token: str) -> RenderedChat:
    """Render ``messages`` with the tokenizer's (already chosen) template; spans cover each reply.

    A reply span starts where the template's generation prompt ends and stops where the next
    message's text begins. If the template does not put EOS inside a reply, EOS is inserted at the
    reply's end (inside the span), so every response teaches the model to stop.
    """

    def render(prefix: Sequence[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in prefix],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    inserted = 0  # characters of EOS added so far, shifting later offsets
    text = full
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(messages[:index], True)
        through = render(messages[: index + 1], False)
        if not full.startswith(through) or not through.startswith(before):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefixes, "
                "so the reply boundaries are unknown"
            )
        start, end = len(before) + inserted, len(through) + inserted
        if eos_token not in text[start:end]:
            # Insert EOS right after the reply's content (before any template suffix such as "\n").
            content_end = text.find(message.content, start, end)
            at = content_end + len(message.content) if content_end >= 0 else end
            text = text[:at] + eos_token + text[at:]
            inserted += len(eos_token)
            end += len(eos_token)
        else:
            # Stop the span right after EOS: trailing template text (a newline) is not a reply.
            end = text.index(eos_token, start, end) + len(eos_token)
        spans.append((start, end))
    return RenderedChat(text=text, response_spans=tuple(spans))
