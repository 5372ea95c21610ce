"""YAML config text → plain Python values, within bounds a hostile text cannot escape.

YAML aliases let 1 KB of text name a value of billions of nodes ("billion laughs"): loading it is
cheap (an alias shares the anchored object), but anything that walks the value (an error's repr, a
dump, a copy) expands it. The text is composed into nodes first, their expanded size is counted
without expanding anything, and a text whose aliases add more than ``MAX_ALIAS_VALUES`` values (or
over ``MAX_CONFIG_BYTES``) is refused before a Python value exists. Every failure is a ConfigError
naming the line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from lorad.config.limits import MAX_CONFIG_BYTES
from lorad.errors import ConfigError, ConfigProblem

# Values that aliases may add beyond those written out: far above any real use of anchors (a shared
# block of a few keys), far below what can hurt. The written-out values are bounded by the size limit.
MAX_ALIAS_VALUES = 10_000
# libyaml's composer (the C one) stops at this depth itself; the pure-Python one needs telling.
MAX_DEPTH = 200

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_COUNT_CAP = 10**9


def _problem(message: str, fix: str) -> ConfigProblem:
    return ConfigProblem("", message, fix)


def load_yaml_text(text: str, *, source: str) -> Any:
    """The value of the YAML document ``text`` (None when empty).

    Raises ConfigError naming ``source``: text over ``MAX_CONFIG_BYTES``, a syntax error (with its
    line and column), aliases adding more than ``MAX_ALIAS_VALUES`` values, nesting past ``MAX_DEPTH``, or
    a value Python cannot hold (an integer of thousands of digits). Never echoes the text.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            [
                _problem(
                    f"the config is {size:,} bytes; the limit is {MAX_CONFIG_BYTES:,} ({MAX_CONFIG_BYTES // 1024} KB)",
                    "a training config is a few KB of `key: value` lines; keep data (captions, prompts) in files",
                )
            ],
            source,
        )
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(
            [
                _problem(
                    f"YAML syntax error at {where}: {problem}",
                    "check indentation, quotes and the `key: value` form on that line",
                )
            ],
            source,
        ) from None
    except RecursionError:
        raise ConfigError(
            [_problem("the YAML is nested too deeply", "a config is flat `key: value` lines")], source
        ) from None
    if node is None:
        return None
    _check_size(node, source)
    try:
        return SafeConstructor().construct_document(node)
    except (yaml.YAMLError, ValueError, OverflowError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            [_problem(f"a value{where} cannot be read ({type(err).__name__})", "write plain numbers, text and lists")],
            source,
        ) from None


def _check_size(root: Node, source: str) -> None:
    """Refuse nodes whose alias-expanded size or depth is too large, without expanding them."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk: each node's size is 1 + its children's, each distinct node counted once
    # in `sizes` however many aliases point at it. A node met again while still open is a cycle.
    stack: list[tuple[Node, int, bool]] = [(root, 1, False)]
    open_nodes: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        children = _children(node)
        if not done:
            if depth > MAX_DEPTH:
                _refuse(source, node, f"nesting deeper than {MAX_DEPTH} levels")
            if id(node) in open_nodes:
                _refuse(source, node, "an alias that refers to itself")
            open_nodes.add(id(node))
            stack.append((node, depth, True))
            for child in children:
                if id(child) in open_nodes:
                    _refuse(source, child, "an alias that refers to itself")
                if id(child) not in sizes:
                    stack.append((child, depth + 1, False))
            continue
        open_nodes.discard(id(node))
        # Capped: the count only has to tell "too many" apart, never grow into a huge integer.
        total = min(1 + sum(sizes[id(child)] for child in children), _COUNT_CAP)
        if total - len(sizes) > MAX_ALIAS_VALUES:  # more values than distinct nodes: aliases add them
            _refuse(source, node, f"aliases that expand to more than {MAX_ALIAS_VALUES:,} values")
        sizes[id(node)] = total


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _refuse(source: str, node: Node, what: str) -> None:
    line = node.start_mark.line + 1 if node.start_mark else 0
    raise ConfigError(
        [
            _problem(
                f"the YAML near line {line} has {what}",
                "write the values out (a config needs no anchors or aliases), or use fewer of them",
            )
        ],
        source,
    )
