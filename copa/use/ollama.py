"""The Ollama side of a GGUF export: the model's chat format as a Go TEMPLATE, the Modelfile that
carries the kept instruction and demos, and what Ollama would send for it (for the checks).

The chat format is read off the model's own chat template by rendering probe chats (marker
texts as contents) and cutting the output at the markers: what comes before and after each
role's content. That works for templates that wrap each turn the same way wherever it stands
(ChatML, Llama 3, ...); one that does anything else fails the round trip check and is refused.

No heavy imports: the caller passes a function that renders a chat with the model's template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from copa.use import gotemplate

Chat = list[dict[str, str]]
RenderChat = Callable[[Chat, bool], str]  # (messages, add_generation_prompt) -> text

_SYS, _U1, _A1, _U2 = "COPAPROBESYSTEM", "COPAPROBEUSERONE", "COPAPROBEANSWER", "COPAPROBEUSERTWO"


class ChatFormatError(Exception):
    """The chat template does not reduce to per-role wrappers a Go TEMPLATE can carry."""


@dataclass(frozen=True)
class ChatFormat:
    """Each role's text before and after its content, as the model's chat template writes it."""

    system_head: str  # before the system content (a start-of-text marker included, if any)
    system_tail: str
    no_system_head: str  # what the template writes when a chat has no system turn
    user_head: str
    user_tail: str
    assistant_head: str
    assistant_tail: str
    generation_prompt: str  # after the last user turn, where the answer starts


def _cut(text: str, markers: Sequence[str]) -> list[str]:
    """text split at the markers, which must each occur once, in order."""
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise ChatFormatError(f"the chat template does not write the content {marker!r} "
                                  "exactly once")
        before, rest = rest.split(marker)
        pieces.append(before)
    return [*pieces, rest]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ChatFormatError(f"the chat template wraps {what} differently by position")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ChatFormatError(f"the chat template wraps {what} differently by position")
    return text[:len(text) - len(suffix)]


def chat_format(render: RenderChat) -> ChatFormat:
    """Probe the model's chat template (see the module docstring)."""
    system = {"role": "system", "content": _SYS}
    u1, a1 = {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}
    u2 = {"role": "user", "content": _U2}
    head, x_su, x_ua, x_au, x_end = _cut(render([system, u1, a1, u2], True),
                                         [_SYS, _U1, _A1, _U2])
    user_tail = _cut(render([system, u1], False), [_SYS, _U1])[-1]
    assistant_tail = _cut(render([system, u1, a1], False), [_SYS, _U1, _A1])[-1]
    assistant_head = _strip_prefix(x_ua, user_tail, "the user turn")
    generation_prompt = _strip_prefix(x_end, user_tail, "the user turn")
    user_head = _strip_prefix(x_au, assistant_tail, "the assistant turn")
    system_tail = _strip_suffix(x_su, user_head, "the user turn")
    no_system = _cut(render([u1, a1, u2], True), [_U1, _A1, _U2])[0]
    found = ChatFormat(head, system_tail, _strip_suffix(no_system, user_head, "the first turn"),
                       user_head, user_tail, assistant_head, assistant_tail, generation_prompt)
    for probe in ([system, u1, a1, u2], [u1, a1, u2]):  # the Go template writes them back
        expected = render(probe, True)
        if ollama_render(go_template(found), ollama_values(probe)) != expected:
            raise ChatFormatError("the chat template's turns are not written the same way "
                                  "wherever they stand")
    return found


def _literal(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise ChatFormatError(f"the chat format's text {text!r} cannot go into a Modelfile "
                              "TEMPLATE as is")
    return text


def go_template(fmt: ChatFormat) -> str:
    """The chat format as an Ollama TEMPLATE (Go text/template over .System and .Messages)."""
    lit = _literal
    return ("{{ if .System }}" + lit(fmt.system_head) + "{{ .System }}" + lit(fmt.system_tail)
            + "{{ else }}" + lit(fmt.no_system_head) + "{{ end }}"
            + "{{ range .Messages }}"
            + '{{ if eq .Role "user" }}' + lit(fmt.user_head) + "{{ .Content }}"
            + lit(fmt.user_tail)
            + '{{ else if eq .Role "assistant" }}' + lit(fmt.assistant_head) + "{{ .Content }}"
            + lit(fmt.assistant_tail) + "{{ end }}{{ end }}" + lit(fmt.generation_prompt))


def stop_strings(fmt: ChatFormat, eos_token: str | None) -> list[str]:
    """What ends an answer: the end of an assistant turn (and the tokenizer's eos)."""
    stops = [s for s in (fmt.assistant_tail.strip(), eos_token or "") if s]
    return list(dict.fromkeys(stops))


def ollama_values(messages: Chat) -> dict[str, Any]:
    """The data Ollama gives a TEMPLATE that uses .Messages: every system content joined as
    .System, and the messages with consecutive turns of one role merged (ollama's
    template.Execute and its collate step; server/routes.go puts the Modelfile's SYSTEM
    first, then its MESSAGEs, then the request's turns)."""
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": merged, "Response": ""}


def ollama_render(template: str, values: Mapping[str, Any]) -> str:
    return gotemplate.render(template, values)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ChatFormatError(f'a Modelfile value cannot contain """: {text[:60]!r}')
    return '"""' + text + '"""'


def modelfile(template: str, system: str | None, demos: Chat, params: Mapping[str, Any],
              stops: Sequence[str], notes: Sequence[str] = ()) -> str:
    """An Ollama Modelfile for model.gguf beside it."""
    lines = [f"# {note}" for note in notes]
    lines += ["FROM ./model.gguf", "", f"TEMPLATE {_quoted(template)}", ""]
    if system:
        lines += [f"SYSTEM {_quoted(system)}", ""]
    for message in demos:
        lines.append(f"MESSAGE {message['role']} {_quoted(message['content'])}")
    if demos:
        lines.append("")
    lines += [f"PARAMETER {name} {value}" for name, value in params.items()]
    for stop in stops:
        if '"' in stop or "\n" in stop:
            raise ChatFormatError(f"stop string {stop!r} cannot be written as a Modelfile value")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


_COMMAND = re.compile(r"(FROM|TEMPLATE|SYSTEM|MESSAGE|PARAMETER)[ \t]+", re.I)


def parse_modelfile(text: str) -> dict[str, Any]:
    """The commands of a Modelfile as Ollama's parser reads them (values in \"\"\"...\"\"\" kept
    verbatim, newlines included; one-line values up to the end of the line): {"from", "template",
    "system", "messages": [{role, content}], "parameters": {name: [values]}}."""
    found: dict[str, Any] = {"messages": [], "parameters": {}}
    pos = 0
    while pos < len(text):
        if text[pos] in " \t\r\n":
            pos += 1
            continue
        if text[pos] == "#":
            pos = text.find("\n", pos) + 1 or len(text)
            continue
        command = _COMMAND.match(text, pos)
        if not command:
            raise ValueError(f"Modelfile: no command at {text[pos:pos + 30]!r}")
        name, pos = command.group(1).lower(), command.end()
        extra = None
        if name in ("message", "parameter"):
            extra, pos = re.match(r"(\S+)[ \t]+", text[pos:]).group(1), \
                pos + re.match(r"\S+[ \t]+", text[pos:]).end()
        if text.startswith('"""', pos):
            end = text.index('"""', pos + 3)
            value, pos = text[pos + 3:end], end + 3
        else:
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end
            value, pos = text[pos:end].strip(), end
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
        if name == "message":
            found["messages"].append({"role": extra, "content": value})
        elif name == "parameter":
            found["parameters"].setdefault(extra, []).append(value)
        else:
            found[name] = value
    return found


def ollama_prompt(modelfile_text: str, user: str) -> str:
    """The text Ollama sends the model for one user turn under this Modelfile."""
    parsed = parse_modelfile(modelfile_text)
    messages = ([{"role": "system", "content": parsed["system"]}] if parsed.get("system")
                else []) + parsed["messages"] + [{"role": "user", "content": user}]
    return ollama_render(parsed["template"], ollama_values(messages))
