"""The Ollama ``Modelfile`` of an exported adapter: FROM the base GGUF, ADAPTER the adapter GGUF, the chat
TEMPLATE and the stop PARAMETERs.

Ollama templates are Go templates, not Jinja, so the run's chat template is translated by example: it is
rendered (by transformers, as in training) around sentinel messages, which yields each role's text before
and after the content and the generation prompt; those become a Go template over Ollama's ``.Messages``
(``.Role``, ``.Content``). Literal text is emitted as quoted Go strings (``{{ "..." }}``) so Go's
whitespace trimming never eats a newline the model was trained with. The tokenizer's BOS text is
dropped: llama.cpp adds BOS itself when the GGUF says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorad.atomic import write_text_atomic
from lorad.errors import ExportError

ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063LORAD{}\u2063"


def _render(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def role_wrappers(tokenizer) -> tuple[dict[str, tuple[str, str]], str]:
    """({role: (before content, after content)}, generation prompt) of the tokenizer's chat template."""
    bos = tokenizer.bos_token or ""

    def strip_bos(text: str) -> str:
        return text[len(bos) :] if bos and text.startswith(bos) else text

    wrappers: dict[str, tuple[str, str]] = {}
    user = _SENTINEL.format("U")
    try:
        alone = strip_bos(_render(tokenizer, [{"role": "user", "content": user}], False))
        with_prompt = strip_bos(_render(tokenizer, [{"role": "user", "content": user}], True))
        before, _, after = alone.partition(user)
        wrappers["user"] = (before, after)
        generation = with_prompt[len(alone) :] if with_prompt.startswith(alone) else ""
        for role in ("system", "assistant"):
            content = _SENTINEL.format(role[0].upper())
            messages = [{"role": role, "content": content}, {"role": "user", "content": user}]
            if role == "assistant":
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": content}]
            text = strip_bos(_render(tokenizer, messages, False))
            if role == "system":
                head, _, rest = text.partition(content)
                wrappers[role] = (
                    head,
                    rest[: rest.index(wrappers["user"][0] + user)]
                    if wrappers["user"][0] + user in rest
                    else rest.partition(user)[0],
                )
            else:
                head, _, rest = text.partition(alone)
                start, _, end = rest.partition(content)
                wrappers[role] = (start, end)
    except Exception as err:  # jinja errors of a template that cannot render these shapes
        raise ExportError(
            f"the chat template cannot be turned into an Ollama TEMPLATE ({err})",
            "Edit TEMPLATE in the Modelfile by hand.",
        ) from None
    return wrappers, generation


def _go(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(wrappers: dict[str, tuple[str, str]], generation: str) -> str:
    """An Ollama (Go) template over ``.Messages`` equivalent to the wrappers."""
    lines = ["{{- range $i, $m := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    for index, role in enumerate(r for r in ROLES if r in wrappers):
        keyword = "if" if index == 0 else "else if"
        before, after = wrappers[role]
        lines.append(f'{{{{- {keyword} eq $m.Role "{role}" }}}}{_go(before)}{{{{ $m.Content }}}}{_go(after)}')
    lines.append("{{- end }}")
    if generation:
        lines.append(f'{{{{- if and $last (ne $m.Role "assistant") }}}}{_go(generation)}{{{{ end }}}}')
    lines.append("{{- end }}")
    return "\n".join(lines)


def stop_words(tokenizer, wrappers: dict[str, tuple[str, str]]) -> list[str]:
    """The end-of-turn text: EOS, and the special tokens that open a user or system turn."""
    specials = set(tokenizer.all_special_tokens)
    words = [tokenizer.eos_token] if tokenizer.eos_token else []
    for role in ("user", "system"):
        before = wrappers.get(role, ("", ""))[0]
        words += [token for token in specials if token and token in before and token != tokenizer.bos_token]
    return list(dict.fromkeys(words))


def _quote(text: str) -> str:
    """A Modelfile argument: triple-quoted when it holds newlines or quotes (Ollama's multi-line form)."""
    if '"""' in text:
        raise ExportError("the chat template holds three double quotes in a row, which a Modelfile cannot quote")
    return f'"""{text}"""' if ("\n" in text or '"' in text or text != text.strip() or not text) else text


def write_modelfile(folder: Path, *, base_gguf: str, adapter_gguf: str, tokenizer_dir: Path) -> Path:
    """Write ``folder/Modelfile`` (paths relative to it, as Ollama resolves them from the Modelfile's folder)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    wrappers, generation = role_wrappers(tokenizer)
    lines = [
        "# Ollama Modelfile written by lorad: the base model with the trained LoRA adapter on top.",
        f"FROM ./{base_gguf}",
        f"ADAPTER ./{adapter_gguf}",
        f"TEMPLATE {_quote(go_template(wrappers, generation))}",
    ]
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stop_words(tokenizer, wrappers)]
    path = folder / "Modelfile"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
