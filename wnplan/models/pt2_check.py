"""Checks that a `.pt2` archive contains only data before `torch.export.load` reads it.

`torch.export.load` (torch 2.13) runs code from the file in four ways, and its documentation
warns never to load untrusted files:

- symbolic shape expressions (`expr_str`) are parsed with `sympy.sympify`, which evaluates them
  as Python;
- input guards (`guards_code`) are compiled with `exec` when the program becomes a module;
- pickled weights and constants are unpickled, falling back to full unpickling when the
  restricted (`weights_only`) unpickler refuses them;
- custom and opaque objects are unpickled.

Without `--trust`, wnplan reads every JSON member of the archive first and accepts an
expression or a guard only if its Python syntax tree contains nothing but arithmetic,
comparisons, symbol names, and calls of the known shape functions. It rejects archives with
pickled objects, and loads the rest with torch's unpickler forced to `weights_only` mode.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._sympy.functions as shape_functions
from torch._export.verifier import SpecViolationError

from wnplan.errors import ModelError

logger = logging.getLogger(__name__)

PICKLED_MEMBER_PREFIXES = ("custom_obj_", "opaque_obj_")
TRUST_HINT = "pass --trust only if you trust the file's source"

# Functions that torch writes into symbolic shape expressions.
SHAPE_FUNCTIONS = frozenset(
    {
        name
        for name, value in vars(shape_functions).items()
        if isinstance(value, type) and issubclass(value, sympy.Basic)
    }
    | {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Abs", "Max", "Min", "Mod",
        "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
        "Piecewise", "ITE", "BooleanTrue", "BooleanFalse",
    }
)
# Exception types that torch.export.load raises for damaged or incompatible archives (torch
# 2.13): its own errors, the restricted unpickler's refusal, and errors from malformed members.
LOAD_ERRORS = (
    RuntimeError, ValueError, KeyError, EOFError, TypeError, AttributeError, AssertionError, IndexError,
    NotImplementedError, OverflowError, RecursionError, OSError, zipfile.BadZipFile, pickle.UnpicklingError,
    SpecViolationError,
)
# Calls that input guards may make: tensor size queries and pure numeric functions.
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
GUARD_FUNCTIONS = SHAPE_FUNCTIONS | {"max", "min", "abs", "int", "float", "round", "cast_symbool_to_symint_guardless"}
MATH_FUNCTIONS = frozenset(name for name in dir(math) if not name.startswith("_"))

_OPERATOR_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator, ast.unaryop,
    ast.boolop, ast.cmpop, ast.Load,
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def check_archive(path: Path) -> None:
    """Raise ModelError unless the `.pt2` archive at `path` contains only data.

    Raises:
        ModelError: the archive is unreadable, or contains pickled objects, or an expression
            or guard that is not plain arithmetic on shapes.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(archive, info, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise ModelError(f"{path}: not a readable torch.export archive ({_first_line(error)})") from None


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    name = info.filename
    if os.path.basename(name).startswith(PICKLED_MEMBER_PREFIXES):
        raise ModelError(
            f"{path}: the archive contains a pickled Python object ({name}), which runs code when loaded; {TRUST_HINT}"
        )
    if not name.endswith(".json"):
        return
    try:
        document = json.loads(archive.read(info))
    except (ValueError, RecursionError) as error:
        raise ModelError(f"{path}: member {name} is not valid JSON ({_first_line(error)})") from None
    for key, value in _items(document):
        if key == "expr_str":
            _require(isinstance(value, str) and _is_safe(value, guard=False), value, "a shape expression", name, path)
        elif key == "guards_code":
            guards = value if isinstance(value, list) else [value]
            for guard in guards:
                _require(isinstance(guard, str) and _is_safe(guard, guard=True), guard, "an input guard", name, path)


def _require(condition: bool, value: Any, kind: str, member: str, path: Path) -> None:
    if not condition:
        excerpt = str(value)[:80]
        raise ModelError(
            f"{path}: {member} contains {kind} {excerpt!r} that is not plain arithmetic; torch.export.load " +
            f"would run it as Python code, so wnplan does not load the file; {TRUST_HINT}"
        )


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    """Yield every (key, value) pair of a JSON document, depth first, without recursion."""
    pending = [value]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            for key, item in current.items():
                yield key, item
                pending.append(item)
        elif isinstance(current, list):
            pending.extend(current)


def _is_safe(text: str, guard: bool) -> bool:
    """Return whether an expression's syntax tree contains only allowed nodes and calls."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    functions = GUARD_FUNCTIONS if guard else SHAPE_FUNCTIONS
    for node in ast.walk(tree):
        if isinstance(node, _OPERATOR_NODES):
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _IDENTIFIER.match(node.value):
                return False
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg is None or not isinstance(node.value, ast.Constant):
                return False
        elif isinstance(node, ast.Call):
            if not _allowed_call(node.func, functions, guard):
                return False
        elif isinstance(node, ast.Attribute):
            if not (guard and _allowed_attribute(node)):
                return False
        elif isinstance(node, ast.Subscript):
            if not guard:
                return False
        else:
            return False
    return True


def _allowed_call(function: ast.expr, functions: frozenset[str], guard: bool) -> bool:
    if isinstance(function, ast.Name):
        return function.id in functions
    return guard and isinstance(function, ast.Attribute) and _allowed_attribute(function)


def _allowed_attribute(node: ast.Attribute) -> bool:
    if isinstance(node.value, ast.Name) and node.value.id == "math":
        return node.attr in MATH_FUNCTIONS
    if isinstance(node.value, ast.Name) and node.value.id == "torch":
        return node.attr.startswith("sym_")
    return node.attr in GUARD_METHODS


def load_program(path: Path, trust: bool) -> torch.export.ExportedProgram:
    """Load a `.pt2` program; without `trust`, check it first and unpickle weights only.

    Raises:
        ModelError: the file is not a readable program, or it contains code and `trust` is False.
    """
    if not trust:
        check_archive(path)
    with _quiet_torch(), _weights_only(enabled=not trust):
        try:
            return torch.export.load(str(path))
        except LOAD_ERRORS as error:
            hint = " (pickled data that only --trust allows)" if "weights_only" in str(error).lower() else ""
            raise ModelError(f"{path}: not a readable torch.export program{hint} ({_first_line(error)})") from None


@contextlib.contextmanager
def _weights_only(enabled: bool) -> Iterator[None]:
    """Force torch.load to use its restricted unpickler while the block runs."""
    if not enabled:
        yield
        return
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch's loader warnings (some with tracebacks) off stderr; log them at debug level."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            logger.debug("torch.export.load: %s", warning.message)
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
