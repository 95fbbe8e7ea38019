"""The one formatting path: a task example -> chat messages, for training AND inference.

A prompt template is a Jinja file with three blocks, `system`, `user` and `assistant`. Each block
sees: `instructions`, `choices`, `inputs` (field -> value), `outputs` (field -> value; in the
assistant block), `input_fields`, `output_fields`, and every field by its own name. Values are
text, except retrieved passages (`retrieve.field`), a list of texts.

Demos become earlier user/assistant turns rendered by the same blocks. The Axolotl training rows
(`training_row`) and the DSPy adapter's messages (`copa.dspy.adapter`) both come from
`build_messages`, so a fine-tuned model is always prompted in the format it was trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from copa.files import missing_file_reason

BLOCKS = ("system", "user", "assistant")
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
MAX_TEMPLATE_BYTES = 100_000


class PromptError(Exception):
    """A template that cannot be loaded or rendered; `file` and `where` locate it."""

    def __init__(self, file: str, message: str, where: str = "prompt.template"):
        self.file, self.where, self.message = file, where, message
        super().__init__(f"{file}: {where}: {message}")


def templates_dir() -> Path:
    return TEMPLATES_DIR


MAX_TEMPLATE_RANGE = 10_000  # range() in a template: far above a prompt's needs
MAX_TEMPLATE_VALUE = 1_000_000  # characters or items a template's `*` may build
MAX_POWER_DIGITS = 1_000  # digits a template's `**` may build


class _PromptSandbox(ImmutableSandboxedEnvironment):
    """Templates are shared between people and must not reach Python internals (the sandbox),
    nor stall or exhaust the machine with their own arithmetic: `*` and `**` are checked before
    they run, and nothing is computed while compiling (a template is checked at `copa
    validate`: `{{ 2**20000 }}` would be computed there)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _too_big_power(left, right):
            raise SecurityError(f"{left!r} ** {right!r} is too large for a prompt")
        if operator == "*" and _too_big_repeat(left, right):
            raise SecurityError("a repetition over "
                                f"{MAX_TEMPLATE_VALUE} characters or items is too large")
        return super().call_binop(context, operator, left, right)


def _too_big_power(base: Any, exponent: Any) -> bool:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (base, exponent)):
        return False
    if abs(base) <= 1 or exponent <= 0:
        return False
    return exponent * math.log10(abs(base)) > MAX_POWER_DIGITS


def _too_big_repeat(left: Any, right: Any) -> bool:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
            return len(seq) * times > MAX_TEMPLATE_VALUE
    return False


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_TEMPLATE_RANGE:
        raise SecurityError(f"range() of {len(numbers)} items: a template may loop at most "
                            f"{MAX_TEMPLATE_RANGE} times")
    return numbers


def _environment() -> ImmutableSandboxedEnvironment:
    environment = _PromptSandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=False,
        lstrip_blocks=False,
        optimized=False,  # no constant folding: a template's arithmetic runs when it renders
    )
    environment.globals["range"] = _bounded_range
    return environment


def find_template(name: str, base_dir: Path | None = None) -> Path:
    """A template path as written in a recipe: relative to the recipe, else to templates/."""
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate
    if base_dir is not None and (base_dir / candidate).exists():
        return base_dir / candidate
    return TEMPLATES_DIR / candidate


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded prompt template: its source text and compiled blocks."""

    path: str
    text: str
    _template: jinja2.Template = field(repr=False, compare=False)

    @classmethod
    def from_file(cls, path: Path, label: str | None = None) -> PromptTemplate:
        label = label or str(path)
        reason = missing_file_reason(path)
        if reason == "no such file":
            raise PromptError(label, "template file not found", where="prompt.template")
        if reason:
            raise PromptError(label, f"{reason}, not a template file")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise PromptError(label, "template file is over 100 kB")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PromptError(label, "template is not UTF-8 text") from None
        return cls.from_string(text, label)

    @classmethod
    def from_string(cls, text: str, label: str = "<template>") -> PromptTemplate:
        environment = _environment()
        try:
            tree = environment.parse(text)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(label, f"line {exc.lineno}: {exc.message}") from None
        # A template is one file: its text is what the run's cache keys hash, so a second file
        # it pulled in could change without anything re-running.
        for node in tree.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
            tag = {"Include": "include", "Extends": "extends"}.get(type(node).__name__, "import")
            raise PromptError(label, f"line {node.lineno}: {{% {tag} %}} is not allowed: a "
                                     "prompt template is one file; paste the other file's text in")
        try:
            template = environment.from_string(tree)
        except Exception as exc:  # the compiler refused something parse() let through
            raise PromptError(label, f"cannot compile: {type(exc).__name__}: {exc}") from None
        missing = [b for b in ("user", "assistant") if b not in template.blocks]
        if missing:
            raise PromptError(
                label,
                f"missing block(s) {', '.join(missing)}: a prompt template defines "
                "{% block system %}, {% block user %} and {% block assistant %}",
            )
        return cls(path=label, text=text, _template=template)

    def render_block(self, block: str, context: Mapping[str, Any]) -> str:
        if block not in self._template.blocks:
            return ""
        try:
            ctx = self._template.new_context(dict(context))
            return "".join(self._template.blocks[block](ctx)).strip()
        except SecurityError as exc:
            raise PromptError(self.path, f"block {block}: refused by the sandbox: {exc}") from None
        except jinja2.UndefinedError as exc:
            raise PromptError(
                self.path,
                f"block {block}: {exc.message} (variables: instructions, choices, inputs, "
                f"outputs, input_fields, output_fields, {', '.join(_field_names(context))})",
            ) from None
        except jinja2.TemplateError as exc:
            raise PromptError(self.path, f"block {block}: {exc}") from None
        except Exception as exc:  # a template's own arithmetic or filter error
            raise PromptError(self.path, f"block {block}: {type(exc).__name__}: {exc}") from None


def _field_names(context: Mapping[str, Any]) -> list[str]:
    return list(context.get("input_fields", [])) + list(context.get("output_fields", []))


@dataclass(frozen=True)
class PromptSpec:
    """Everything needed to turn an example into messages."""

    template: PromptTemplate
    instructions: str
    input_fields: tuple[str, ...]
    output_fields: tuple[str, ...]
    choices: tuple[str, ...] | None = None

    def with_instructions(self, instructions: str) -> PromptSpec:
        return PromptSpec(self.template, instructions, self.input_fields, self.output_fields,
                          self.choices)

    def with_fields(self, input_fields: Sequence[str], output_fields: Sequence[str]) -> PromptSpec:
        return PromptSpec(self.template, self.instructions, tuple(input_fields),
                          tuple(output_fields), self.choices)

    def _context(self, example: Mapping[str, Any], with_outputs: bool) -> dict[str, Any]:
        missing = [f for f in self.input_fields if f not in example]
        if missing:
            raise PromptError(self.template.path, f"example lacks input field(s) {missing}",
                              where="task.signature")
        inputs = {f: example[f] for f in self.input_fields}
        context: dict[str, Any] = {
            "instructions": self.instructions,
            "choices": list(self.choices) if self.choices else None,
            "input_fields": list(self.input_fields),
            "output_fields": list(self.output_fields),
            "inputs": inputs,
            "outputs": {},
            **inputs,
        }
        if with_outputs:
            missing = [f for f in self.output_fields if f not in example]
            if missing:
                raise PromptError(self.template.path,
                                  f"example lacks output field(s) {missing}",
                                  where="task.signature")
            outputs = {f: example[f] for f in self.output_fields}
            context["outputs"] = outputs
            context.update(outputs)
        return context

    def system_message(self) -> str:
        return self.template.render_block("system", self._context({f: "" for f in
                                                                   self.input_fields}, False))

    def user_message(self, example: Mapping[str, Any]) -> str:
        return self.template.render_block("user", self._context(example, False))

    def assistant_message(self, example: Mapping[str, Any]) -> str:
        return self.template.render_block("assistant", self._context(example, True))


def field_value(value: Any) -> str | list[str]:
    """A field's value as templates see it: text, or a list of texts (retrieved passages)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value)


def build_messages(spec: PromptSpec, inputs: Mapping[str, Any],
                   demos: Sequence[Mapping[str, Any]] = (),
                   target: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """Chat messages for one example: system, demo turns, the user turn, and the target if given."""
    messages: list[dict[str, str]] = []
    system = spec.system_message()
    if system:
        messages.append({"role": "system", "content": system})
    for demo in demos:
        messages.append({"role": "user", "content": spec.user_message(demo)})
        messages.append({"role": "assistant", "content": spec.assistant_message(demo)})
    messages.append({"role": "user", "content": spec.user_message(inputs)})
    if target is not None:
        messages.append({"role": "assistant", "content": spec.assistant_message(target)})
    return messages


def training_row(spec: PromptSpec, example: Mapping[str, Any],
                 demos: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """An Axolotl `chat_template` row; loss only on the final assistant turn (the target)."""
    return target_row(build_messages(spec, example, demos, target=example))


def target_row(messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Chat messages as an Axolotl `chat_template` row that trains on its final turn alone (the
    answer; earlier turns, demos included, are context)."""
    last = len(messages) - 1
    return {"messages": [{**m, "training": i == last} for i, m in enumerate(messages)]}


def parse_completion(text: str, output_fields: Sequence[str]) -> dict[str, str]:
    """Inverse of the assistant block: one field = the whole text; several = `name: value` lines."""
    text = text.strip()
    if len(output_fields) == 1:
        return {output_fields[0]: text}
    pattern = re.compile(
        r"^\s*(" + "|".join(re.escape(f) for f in output_fields) + r")\s*:\s?", re.MULTILINE
    )
    found: dict[str, str] = {}
    matches = list(pattern.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = match.group(1)
        if name not in found:
            found[name] = text[match.end():end].strip()
    if not matches:
        # No labels at all: the last field (the answer) takes the text.
        found[output_fields[-1]] = text
    return found


def load_spec(template_path: Path, instructions: str, input_fields: Sequence[str],
              output_fields: Sequence[str], choices: Sequence[str] | None,
              label: str | None = None) -> PromptSpec:
    return PromptSpec(
        template=PromptTemplate.from_file(template_path, label),
        instructions=instructions,
        input_fields=tuple(input_fields),
        output_fields=tuple(output_fields),
        choices=tuple(choices) if choices else None,
    )


def default_instructions(input_fields: Sequence[str], output_fields: Sequence[str]) -> str:
    """DSPy's own wording for a signature without instructions, so both sides agree."""
    inputs = ", ".join(f"`{f}`" for f in input_fields)
    outputs = ", ".join(f"`{f}`" for f in output_fields)
    return f"Given the fields {inputs}, produce the fields {outputs}."


def spec_from_recipe(recipe: Any) -> PromptSpec:
    """The PromptSpec a recipe describes (the program's outputs, incl. reasoning for CoT)."""
    outputs = list(recipe.task.output_fields)
    if recipe.task.module == "chain_of_thought":
        outputs = ["reasoning", *outputs]
    inputs = list(recipe.task.input_fields)
    retrieve = getattr(recipe, "retrieve", None)
    if retrieve is not None:  # the retrieved passages come first, as the program passes them
        inputs = [retrieve.field, *inputs]
    instructions = recipe.task.instructions or default_instructions(
        recipe.task.input_fields, recipe.task.output_fields)
    path = find_template(recipe.prompt.template, recipe.base_dir)
    reason = missing_file_reason(path)
    if reason == "no such file":
        raise PromptError(str(recipe.source_path or "<recipe>"), (
            f"template file not found: looked for '{recipe.prompt.template}' beside the recipe "
            f"and in {TEMPLATES_DIR}"))
    if reason:
        raise PromptError(str(recipe.source_path or "<recipe>"),
                          f"{recipe.prompt.template}: {reason}, not a template file")
    return load_spec(path, instructions, inputs, outputs, recipe.task.choices, label=str(path))


def preview(spec: PromptSpec, examples: Sequence[Mapping[str, Any]],
            with_targets: bool = True) -> str:
    """Human-readable rendering of training rows (or of prompts only), for
    prompt_preview.txt."""
    chunks = []
    for n, example in enumerate(examples, 1):
        chunks.append(f"===== example {n} =====")
        for message in build_messages(spec, example,
                                      target=example if with_targets else None):
            chunks.append(f"--- {message['role']} ---\n{message['content']}")
    return "\n".join(chunks) + "\n"
