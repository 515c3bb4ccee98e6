"""Command-line overrides of a spec (``--set KEY=VALUE``), applied to the spec's data before validation.

A key is a dotted path into the spec as written (after its ``base:`` fragment is merged in):
``recipe.epochs``, ``tiers.smoke.batch_size``, ``methods.WTTM.losses.wttm.weight``. Cells are addressed by index,
``cells[3]``, or by pair and method, ``cells[wrn_40_2->wrn_16_2/WTTM]`` (``cells[resnet8/Student]``: that student
and method with any teacher, or none; ``*`` matches any teacher, student or method: ``cells[*/WTTM]`` is every
WTTM cell). The value
is parsed as a YAML scalar or list (``0.2``, ``true``, ``null``, ``[150, 180, 210]``).

The overridden data goes through the same schema and domain checks as the file; the file is never written. An
override changes the resolved configs, hence the run ids, of exactly the runs it reaches.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

import yaml

from repro.core.errors import ReproError

_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[[^\[\]]*\])*)")
# Mappings whose keys are names the spec defines: an override may change an entry, never invent one (a typo in
# a method name would otherwise add an unused method and change nothing, silently).
_NAMED_ENTRIES = ("methods", "models")


@dataclass(frozen=True)
class CellSelector:
    """``[teacher->]student/method``, each part a name or ``*``."""

    teacher: str  # "*" when the selector names no teacher
    student: str
    method: str

    def matches(self, cell: dict[str, Any]) -> bool:
        teacher_ok = self.teacher == "*" or cell.get("teacher") == self.teacher
        return (teacher_ok and self.student in ("*", cell.get("student"))
                and self.method in ("*", cell.get("method")))

    def __str__(self) -> str:
        pair = f"{self.teacher}->{self.student}" if self.teacher != "*" else self.student
        return f"{pair}/{self.method}"


Step = Union[str, int, CellSelector]


@dataclass(frozen=True)
class Override:
    text: str  # as given: KEY=VALUE
    path: tuple[Step, ...]
    value: Any

    @property
    def key(self) -> str:
        return self.text.split("=", 1)[0]


def parse_override(text: str) -> Override:
    if "=" not in text:
        raise ReproError(f"--set {text!r}: expected KEY=VALUE (e.g. recipe.epochs=60)")
    key, raw_value = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ReproError(f"--set {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw_value) if raw_value else None
    except yaml.YAMLError as err:
        raise ReproError(f"--set {text!r}: the value is not YAML: {str(err).splitlines()[0]}") from None
    if isinstance(value, dict):
        raise ReproError(f"--set {text!r}: a value is a scalar or a list; set the keys of a mapping one by one")
    return Override(f"{key}={raw_value}", _parse_path(key, text), value)


def _parse_path(key: str, text: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    for part in _split_dots(key):
        match = _SEGMENT.fullmatch(part)
        if not match:
            raise ReproError(f"--set {text!r}: cannot read key segment {part!r}")
        steps.append(match.group(1))
        for selector in re.findall(r"\[([^\[\]]*)\]", match.group(2)):
            steps.append(_parse_selector(selector.strip(), text))
    return tuple(steps)


def _split_dots(key: str) -> list[str]:
    """Split on dots outside brackets (a selector may hold dots in model names)."""
    parts, depth, current = [], 0, ""
    for ch in key:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _parse_selector(selector: str, text: str) -> Union[int, CellSelector]:
    if re.fullmatch(r"-?\d+", selector):
        return int(selector)
    pair, sep, method = selector.rpartition("/")
    if not sep or not pair or not method:
        raise ReproError(f"--set {text!r}: cell selector [{selector}] is not an index, "
                         f"[TEACHER->STUDENT/METHOD] or [STUDENT/METHOD]")
    teacher, arrow, student = pair.partition("->")
    if not arrow:
        teacher, student = "*", pair
    return CellSelector(teacher.strip(), student.strip(), method.strip())


def apply_overrides(raw: dict[str, Any], overrides: Sequence[Override],
                    unmatched_cells_ok: bool = False) -> tuple[dict[str, Any], list[Override]]:
    """A copy of ``raw`` with every override applied, and the overrides that reached something.

    ``unmatched_cells_ok``: a cell selector that matches no cell leaves this spec alone (an output rendered by
    several specs: the cell lives in one of them) instead of being an error.
    """
    out = copy.deepcopy(raw)
    applied = []
    for override in overrides:
        if _apply(out, override, unmatched_cells_ok):
            applied.append(override)
    return out, applied


def _apply(data: dict[str, Any], override: Override, unmatched_cells_ok: bool) -> bool:
    nodes: list[Any] = [data]
    where = ""
    path = override.path
    for i, step in enumerate(path[:-1]):
        nxt_is_list = isinstance(path[i + 1], (int, CellSelector))
        children = []
        for node in nodes:
            children += _descend(node, step, where, override, nxt_is_list, unmatched_cells_ok)
        if not children:
            return False
        nodes = children
        where = f"{where}.{step}" if isinstance(step, str) and where else (where + _show(step))
    last = path[-1]
    if isinstance(last, (int, CellSelector)):
        raise ReproError(f"--set {override.text!r}: set a field of the cell ({override.key}.FIELD=...), "
                         f"not the whole cell")
    for node in nodes:
        if not isinstance(node, dict):
            raise ReproError(f"--set {override.text!r}: {where or 'the spec'} is a {type(node).__name__}, "
                             f"not a mapping with key {last!r}")
        node[last] = copy.deepcopy(override.value)
    return True


def _show(step: Step) -> str:
    return f"[{step}]" if not isinstance(step, str) else step


def _descend(node: Any, step: Step, where: str, override: Override, list_next: bool,
             unmatched_cells_ok: bool) -> list[Any]:
    if isinstance(step, str):
        if not isinstance(node, dict):
            raise ReproError(f"--set {override.text!r}: {where} is a {type(node).__name__}, not a mapping")
        if step not in node:
            if where in _NAMED_ENTRIES:
                raise ReproError(f"--set {override.text!r}: the spec defines no {where[:-1]} {step!r}; "
                                 f"it defines {', '.join(sorted(node)) or '(none)'}")
            if list_next:
                raise ReproError(f"--set {override.text!r}: the spec has no list {step!r} to index")
            node[step] = {}  # e.g. cells[3].params.wttm when the cell sets no params yet: checked by the schema
        elif where.endswith("losses") and isinstance(node[step], (int, float)) and not isinstance(node[step], bool):
            node[step] = {"weight": float(node[step])}  # a term written as its bare weight, now given parameters
        return [node[step]]
    if not isinstance(node, list):
        raise ReproError(f"--set {override.text!r}: {where} is not a list; [{step}] addresses a list entry")
    if isinstance(step, int):
        if not -len(node) <= step < len(node):
            raise ReproError(f"--set {override.text!r}: {where} has {len(node)} entries (indices 0..{len(node) - 1})")
        return [node[step]]
    matched = [cell for cell in node if isinstance(cell, dict) and step.matches(cell)]
    if not matched and not unmatched_cells_ok:
        known = ", ".join(str(CellSelector(c.get("teacher") or "*", c.get("student"), c.get("method")))
                          for c in node if isinstance(c, dict))
        raise ReproError(f"--set {override.text!r}: no cell matches [{step}]; the cells are: {known}")
    return matched


def describe(overrides: Sequence[Override]) -> str:
    return ", ".join(f"`{o.text}`" for o in overrides)
