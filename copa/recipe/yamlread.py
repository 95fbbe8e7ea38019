"""YAML reading with bounds, for recipes, study files and --set values: work and memory are
bounded before anything walks the data (alias expansion, nesting depth, document size, integer
size), and a key written twice in one mapping is an error naming both lines (YAML would keep
the last one silently).

A document of under 1 KB built from nested aliases expands to billions of nodes: its composed
graph is small, so its expanded size is counted on the graph (each node once) and refused.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from copa.text import lone_surrogate

MAX_YAML_BYTES = 1_000_000
MAX_DEPTH = 40  # a recipe is 3-4 levels deep; Axolotl pass-through maps a few more
MAX_NODES = 100_000  # after alias expansion: far beyond any recipe, far below a MemoryError
MAX_INT_DIGITS = 19  # a 64-bit integer; seeds, steps and sizes all fit
_MERGE = "tag:yaml.org,2002:merge"
_INT = "tag:yaml.org,2002:int"


class YAMLProblem(ValueError):
    """Unreadable or unbounded YAML: a one-line message with its line, and the key path."""

    def __init__(self, message: str, path: str = "") -> None:
        self.message, self.path = message, path
        super().__init__(f"{path}: {message}" if path else message)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses nesting past MAX_DEPTH while composing (its recursion would
    otherwise end in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _key_text(node: Node) -> str | None:
    return str(node.value) if isinstance(node, ScalarNode) else None


def _check_int(node: ScalarNode, path: str) -> None:
    """Python parses any number of digits (slowly past thousands, then refuses with a
    ValueError YAML does not expect): more than a 64-bit integer is refused here."""
    digits = str(node.value).replace("_", "").lstrip("+-")
    try:
        too_big = len(digits) > MAX_INT_DIGITS + 2 or abs(int(digits, 0)) >= 2**63
    except ValueError:  # 0o17, 0x1F, 017 (YAML 1.1 octal) and the like: small, let YAML read it
        too_big = len(digits) > MAX_INT_DIGITS + 2
    if too_big:
        raise YAMLProblem(f"line {_line(node)}: integer of {len(digits)} digits, over the "
                          f"64-bit range", path)


def check_graph(root: Node) -> None:
    """Expanded size, expanded depth, recursive aliases and duplicate keys of a composed
    document, visiting each node once (aliases share nodes); raises YAMLProblem."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded height)
    active: set[int] = set()

    def visit(node: Node, path: str) -> tuple[int, int]:
        key = id(node)
        if key in done:
            return done[key]
        if key in active:
            raise YAMLProblem(f"line {_line(node)}: an alias refers to a node that contains "
                              "it (recursive alias)", path)
        active.add(key)
        size, height = 1, 0
        if isinstance(node, ScalarNode) and node.tag == _INT:
            _check_int(node, path)
        lone = isinstance(node, ScalarNode) and lone_surrogate(node.value)
        if lone:  # "\ud800" in double quotes: no file, tokenizer or UTF-8 text can hold it
            raise YAMLProblem(f"line {_line(node)}: a lone surrogate (U+{ord(lone):04X}) "
                              "is not text", path)
        if isinstance(node, SequenceNode):
            for i, child in enumerate(node.value):
                s, h = visit(child, f"{path}[{i}]")
                size, height = size + s, max(height, h + 1)
        elif isinstance(node, MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                name = _key_text(key_node)
                if name is not None and key_node.tag != _MERGE:
                    if name in seen:
                        where = f"{path}.{name}" if path else name
                        raise YAMLProblem(f"line {_line(key_node)}: duplicate key '{name}' "
                                          f"(first on line {seen[name]}); keep one", where)
                    seen[name] = _line(key_node)
                child_path = f"{path}.{name}" if path and name else (name or path)
                ks, kh = visit(key_node, path)
                vs, vh = visit(value_node, child_path)
                size, height = size + ks + vs, max(height, kh + 1, vh + 1)
        if size > MAX_NODES:
            raise YAMLProblem(f"line {_line(node)}: expands to more than {MAX_NODES} values "
                              "(aliases repeated inside aliases?)", path)
        if height > MAX_DEPTH:
            raise YAMLProblem(f"line {_line(node)}: nested more than {MAX_DEPTH} levels deep "
                              "once its aliases are expanded", path)
        active.discard(key)
        done[key] = (size, height)
        return done[key]

    visit(root, "")


def read_yaml(text: str) -> Any:
    """The data of one YAML document, bounded and checked (YAMLProblem: one line, with the
    line number and, where known, the key path)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise YAMLProblem(f"over {MAX_YAML_BYTES // 1_000_000} MB of YAML")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_graph(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise YAMLProblem(f"{where}{problem}") from None
    except RecursionError:
        raise YAMLProblem(f"nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()
