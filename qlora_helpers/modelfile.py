"""The Ollama ``Modelfile`` written beside each GGUF file (qlora_helpers.gguf_export).

llama.cpp formats a conversation with the Jinja chat template stored in the GGUF (``tokenizer.chat_template``).
Ollama does not run Jinja: ``ollama create`` compares that template with the few it knows and, when none is
close, formats with ``{{ .Prompt }}`` alone, so the model would see none of the turn markers it was trained on
(SmolLM2's template adds a default system message, which no stock ChatML template does). The Modelfile therefore
carries its own TEMPLATE, in Ollama's Go template language, built here from the very template training used:

* the chat template is rendered with marker strings in place of the messages, and cut at the markers into the
  text before and after each role's content; the parts are put back together for four conversations (with and
  without a system message, one and two user turns) and must give exactly the Jinja rendering, or a single-turn
  template (what training's prompts are) is written instead;
* ``data.template: alpaca`` gets the Alpaca prompt training used.

The end-of-turn token training taught the model to emit is a ``stop`` parameter; ``data.system_prompt`` is the
SYSTEM line. Sampling is left to Ollama's defaults, the evaluation's greedy decoding being one ``PARAMETER
temperature 0`` away.
"""
from __future__ import annotations

from typing import Any

SYSTEM, USER1, ASSISTANT1, USER2 = "QQSYSTEMQQ", "QQUSERONEQQ", "QQASSISTANTONEQQ", "QQUSERTWOQQ"


def _go(text: str) -> str:
    """Literal text inside a Go template: only ``{{`` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def _render(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def _cut(text: str, *markers: str) -> list[str] | None:
    """``text`` cut at each marker in order (each exactly once), or None."""
    parts, rest = [], text
    for m in markers:
        if rest.count(m) != 1:
            return None
        before, rest = rest.split(m)
        parts.append(before)
    return parts + [rest]


def _split_after(text: str, token: str) -> int:
    """Where an end-of-turn token and the line breaks after it end in ``text`` (0 if it is not there)."""
    at = text.find(token)
    if at < 0:
        return 0
    at += len(token)
    while at < len(text) and text[at] in "\r\n":
        at += 1
    return at


def chat_parts(tokenizer, end_token: str) -> dict[str, str] | None:
    """The chat template as text around each role's content, checked to reproduce the template; None if the
    template is not of that shape (then a single-turn TEMPLATE is written)."""
    u = _render(tokenizer, [{"role": "user", "content": USER1}], True)
    u_no_gen = _render(tokenizer, [{"role": "user", "content": USER1}], False)
    uau = _render(tokenizer, [{"role": "user", "content": USER1}, {"role": "assistant", "content": ASSISTANT1},
                              {"role": "user", "content": USER2}], True)
    cut_u, cut_uau = _cut(u, USER1), _cut(uau, USER1, ASSISTANT1, USER2)
    if not cut_u or not cut_uau:
        return None
    head_u, tail_u = cut_u
    _, user_to_assistant, assistant_to_user, _ = cut_uau
    gen_len = len(u) - len(next((u[:i] for i in range(len(u), -1, -1) if u_no_gen.startswith(u[:i])), ""))
    user_end = tail_u[: len(tail_u) - gen_len]
    # The user turn's end: up to and after the end-of-turn token where it is there, else what both renderings share.
    user_end = user_end[: _split_after(user_end, end_token)] or user_end
    if not user_to_assistant.startswith(user_end):
        return None
    parts = {"user_end": user_end, "generation": tail_u[len(user_end):],
             "assistant_start": user_to_assistant[len(user_end):]}
    cut = _split_after(assistant_to_user, end_token)
    parts["assistant_end"], parts["user_start"] = assistant_to_user[:cut], assistant_to_user[cut:]
    if not head_u.endswith(parts["user_start"]):
        return None
    parts["head"] = head_u[: len(head_u) - len(parts["user_start"])]
    try:
        su = _render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1}], True)
    except Exception:  # noqa: BLE001 - templates that refuse a system message raise their own error
        su = None
    cut_su = _cut(su, SYSTEM, USER1) if su else None
    if cut_su and cut_su[1].endswith(parts["user_start"]):
        parts["system_start"], parts["system_end"] = cut_su[0], cut_su[1][: len(cut_su[1]) - len(parts["user_start"])]
    if not all(assemble(parts, c) == _render(tokenizer, c, True) for c in _conversations(parts)):
        return None
    return parts


def _conversations(parts: dict[str, str]) -> list[list[dict[str, str]]]:
    one = [{"role": "user", "content": "Hi there."}]
    two = one + [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Add 2 and 3."}]
    system = [{"role": "system", "content": "Answer briefly."}]
    return [one, two] + ([system + one, system + two] if "system_start" in parts else [])


def assemble(parts: dict[str, str], messages: list[dict[str, str]]) -> str:
    """What the TEMPLATE below makes of ``messages``, computed the same way in Python (the check above)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = parts["system_start"] + system[0] + parts["system_end"] if system else parts["head"]
    for m in messages:
        if m["role"] == "user":
            out += parts["user_start"] + m["content"] + parts["user_end"]
        elif m["role"] == "assistant":
            out += parts["assistant_start"] + m["content"] + parts["assistant_end"]
    return out + parts["generation"]


def messages_template(parts: dict[str, str]) -> str:
    """The Go template for Ollama's message list (it passes every message, system ones too, and .System)."""
    p = {k: _go(v) for k, v in parts.items()}
    head = (f'{{{{- if .System }}}}{p["system_start"]}{{{{ .System }}}}{p["system_end"]}{{{{ else }}}}{p["head"]}{{{{ end }}}}'
            if "system_start" in p else p["head"])
    return (f'{head}{{{{- range .Messages }}}}{{{{ if eq .Role "user" }}}}{p["user_start"]}{{{{ .Content }}}}{p["user_end"]}'
            f'{{{{ else if eq .Role "assistant" }}}}{p["assistant_start"]}{{{{ .Content }}}}{p["assistant_end"]}'
            f'{{{{ end }}}}{{{{ end }}}}{p["generation"]}')


def single_turn_template(prompt_with_marker: str) -> str:
    """One user turn, as training's prompts are: the prompt text with ``{{ .Prompt }}`` in place of the message."""
    return _go(prompt_with_marker).replace(USER1, "{{ .Prompt }}") + "{{ .Response }}"


def ollama_template(tokenizer, formatter) -> tuple[str, str]:
    """(TEMPLATE, how it was made) for training's format: ``formatter`` is qlora_helpers.data.Formatter."""
    if formatter.template == "alpaca":
        return single_turn_template(formatter.prompt_text([{"role": "user", "content": USER1}])), "the Alpaca prompt"
    parts = chat_parts(tokenizer, formatter.end_token)
    if parts:
        return messages_template(parts), "the chat template, every turn"
    prompt = formatter.prompt_text([{"role": "user", "content": USER1}])
    return single_turn_template(prompt), "the chat template, one user turn (its shape has no per-message parts)"


def modelfile(gguf_name: str, template: str, how: str, stops: list[str], system_prompt: str, info: dict[str, Any]) -> str:
    """The Modelfile's text: FROM the GGUF beside it, TEMPLATE, stop tokens, SYSTEM."""
    if '"""' in template:
        raise ValueError("the chat template holds three double quotes in a row, which a Modelfile cannot quote")
    lines = [f"# Ollama: ollama create {info['model']} -f {info['modelfile']} && ollama run {info['model']}",
             f"# TEMPLATE: {how}, as in training (data.template={info['data_template']}); greedy decoding as in the "
             "evaluation: add PARAMETER temperature 0", f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system_prompt:
        lines.append('SYSTEM """' + system_prompt.replace('"""', "'''") + '"""')
    return "\n".join(lines) + "\n"
