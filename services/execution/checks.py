"""Trusted side of the verdict: splits each assert into the parts that need the program and
the parts the service evaluates itself, then decides pass/fail from plain data values.

The sandbox only ever sees the "holes" (sub-expressions that name something the program or the
test setup defines). Literals such as the expected value stay here, so a program can only make a
test pass by producing the expected value, never by faking the comparison: no always-equal
objects (only builtin data crosses the boundary), no redefined AssertionError or builtins (the
comparison runs here with the real ones), no exit codes or printed markers (not consulted).
"""
from __future__ import annotations

import ast
import builtins
import functools
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# Pure builtins the service may apply to values itself when the program does not rebind them.
TRUSTED_FUNCTIONS = {
    name: getattr(builtins, name) for name in (
        "abs", "all", "any", "bool", "complex", "dict", "float", "frozenset", "int", "len",
        "list", "max", "min", "round", "set", "sorted", "str", "sum", "tuple")
}
COMPARISONS = {
    ast.Eq: lambda a, b: approx_equal(a, b), ast.NotEq: lambda a, b: not approx_equal(a, b),
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
# Binary operators on literals that cannot blow up (no *, ** or << on attacker-sized operands).
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
# pytest.approx defaults, which the paper's evaluation uses for floats.
REL_TOL, ABS_TOL = 1e-6, 1e-12


def approx_equal(actual: Any, expected: Any) -> bool:
    """== with floats compared like pytest.approx, recursing into containers."""
    if isinstance(actual, float) or isinstance(expected, float):
        if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) \
                and not isinstance(actual, bool) and not isinstance(expected, bool):
            if math.isinf(actual) or math.isinf(expected):
                return actual == expected
            return math.isclose(actual, expected, rel_tol=REL_TOL, abs_tol=ABS_TOL)
        return actual == expected
    if type(actual) in (list, tuple) and type(actual) is type(expected):
        return len(actual) == len(expected) and all(map(approx_equal, actual, expected))
    if type(actual) is dict and type(expected) is dict:
        return actual.keys() == expected.keys() and all(approx_equal(v, expected[k]) for k, v in actual.items())
    return actual == expected


class NotATest(ValueError):
    pass


@dataclass(frozen=True)
class TestPlan:
    """One assert: its expression, and the sources of its holes in evaluation order."""
    expression: ast.expr
    holes: tuple[str, ...]

    def verdict(self, values: list[Any]) -> bool:
        return bool(_evaluate(self.expression, iter(values)))


def names_bound_by(*sources: str) -> set[str]:
    """Every name the program or setup code binds anywhere (conservative: any scope)."""
    bound: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                bound.update(node.names)
    return bound


def plan_test(source: str, untrusted_names: Callable[[], set[str]]) -> TestPlan:
    """Parses one `assert <expression>` and marks the sub-expressions the sandbox must compute.

    The program's names matter only when the test calls a builtin the service could apply itself,
    so `untrusted_names` (the program's parse) is called only then. Plans are cached: the samples
    of one task share their tests, and only the untrusted names the test mentions change the plan.
    """
    callable_here = _parse_assert(source)[1] & TRUSTED_FUNCTIONS.keys()
    return _plan(source, frozenset(callable_here & untrusted_names()) if callable_here else frozenset())


_IDENTIFIER = re.compile(r"(?!\d)\w+")  # identifier-like words, without parsing
PLAN_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _parse_assert(source: str) -> tuple[ast.expr, frozenset[str]]:
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise NotATest(f"not valid Python: {error.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise NotATest("each test must be exactly one assert statement")
    return tree.body[0].test, frozenset(_IDENTIFIER.findall(source))  # a superset of its names


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(source: str, untrusted: frozenset[str]) -> TestPlan:
    holes: list[str] = []
    lines = source.encode().splitlines(keepends=True)
    split = _split(_parse_assert(source)[0], untrusted, lambda node: holes.append(_source_of(node, lines)))
    return TestPlan(split, tuple(holes))


def _source_of(node: ast.expr, lines: list[bytes]) -> str:
    """The node's exact source text (ast.get_source_segment without its slow line splitting;
    offsets count UTF-8 bytes)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset:node.end_col_offset].decode()
    return (lines[first][node.col_offset:] + b"".join(lines[first + 1:last])
            + lines[last][:node.end_col_offset]).decode()


class _Hole(ast.expr):
    """Placeholder for a value the sandbox computes."""
    _fields = ()


def _split(node: ast.expr, untrusted: frozenset[str], add_hole) -> ast.expr:
    if _trusted(node, untrusted):
        return node
    children: list[ast.expr] | None = None
    if isinstance(node, ast.Compare):
        children = [node.left, *node.comparators]
    elif isinstance(node, ast.BoolOp):
        children = node.values
    elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        children = [node.operand]
    elif isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
        children = node.elts
    elif isinstance(node, ast.Call) and _trusted_function(node.func, untrusted) and \
            not any(isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
        children = [*node.args, *(k.value for k in node.keywords)]
    if children is None:
        add_hole(node)
        return _Hole()
    split = [_split(child, untrusted, add_hole) for child in children]
    if isinstance(node, ast.Compare):
        return ast.Compare(split[0], node.ops, split[1:])
    if isinstance(node, ast.BoolOp):
        return ast.BoolOp(node.op, split)
    if isinstance(node, ast.UnaryOp):
        return ast.UnaryOp(node.op, split[0])
    if isinstance(node, ast.Call):
        return ast.Call(node.func, split[:len(node.args)],
                        [ast.keyword(k.arg, v) for k, v in zip(node.keywords, split[len(node.args):])])
    return type(node)(split, ast.Load())


def _trusted_function(func: ast.expr, untrusted: frozenset[str]) -> bool:
    return isinstance(func, ast.Name) and func.id in TRUSTED_FUNCTIONS and func.id not in untrusted


def _trusted(node: ast.expr, untrusted: frozenset[str]) -> bool:
    """True when the service can evaluate the node itself: literals and pure builtins on them."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(not isinstance(e, ast.Starred) and _trusted(e, untrusted) for e in node.elts)
    if isinstance(node, ast.Dict):
        return None not in node.keys and all(_trusted(e, untrusted) for e in (*node.keys, *node.values))
    if isinstance(node, ast.UnaryOp):
        return type(node.op) in UNARY and _trusted(node.operand, untrusted)
    if isinstance(node, ast.BinOp):
        return type(node.op) in BINARY and _trusted(node.left, untrusted) and _trusted(node.right, untrusted)
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        parts = [node.left, *node.comparators] if isinstance(node, ast.Compare) else node.values
        return all(_trusted(p, untrusted) for p in parts)
    if isinstance(node, ast.Call):
        return (_trusted_function(node.func, untrusted) and all(k.arg for k in node.keywords)
                and all(not isinstance(a, ast.Starred) and _trusted(a, untrusted) for a in node.args)
                and all(_trusted(k.value, untrusted) for k in node.keywords))
    return False


def _evaluate(node: ast.expr, holes: Iterator[Any]) -> Any:
    if isinstance(node, _Hole):
        return next(holes)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_evaluate(e, holes) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(e, holes) for e in node.elts)
    if isinstance(node, ast.Set):
        return {_evaluate(e, holes) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {_evaluate(k, holes): _evaluate(v, holes) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_evaluate(node.operand, holes))
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_evaluate(node.left, holes), _evaluate(node.right, holes))
    if isinstance(node, ast.BoolOp):
        # Every operand is evaluated (holes arrive in order); the result is Python's and/or.
        values = [_evaluate(v, holes) for v in node.values]
        pick = next((v for v in values if not v), values[-1]) if isinstance(node.op, ast.And) \
            else next((v for v in values if v), values[-1])
        return pick
    if isinstance(node, ast.Compare):
        operands = [_evaluate(node.left, holes), *(_evaluate(c, holes) for c in node.comparators)]
        return all(COMPARISONS[type(op)](a, b) for op, a, b in zip(node.ops, operands, operands[1:]))
    if isinstance(node, ast.Call):
        args = [_evaluate(a, holes) for a in node.args]
        kwargs = {k.arg: _evaluate(k.value, holes) for k in node.keywords}
        return TRUSTED_FUNCTIONS[node.func.id](*args, **kwargs)
    raise AssertionError(f"unplanned node {type(node).__name__}")


def decode(tagged: Any, depth: int = 0) -> Any:
    """Rebuilds a value from the sandbox's tagged JSON; anything malformed raises ValueError."""
    if depth > 200 or not isinstance(tagged, list) or not tagged:
        raise ValueError("malformed result from the sandbox")
    tag, rest = tagged[0], tagged[1:]
    if tag == "n":
        return None
    if tag == "B" and isinstance(rest[0], bool):
        return rest[0]
    if tag == "i":
        return int(rest[0], 16)
    if tag == "f":
        return float.fromhex(rest[0])
    if tag == "c":
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s" and isinstance(rest[0], str):
        return rest[0]
    if tag == "b":
        return bytes.fromhex(rest[0])
    if tag in ("l", "t", "S", "F") and isinstance(rest[0], list):
        items = [decode(item, depth + 1) for item in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and isinstance(rest[0], list):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in rest[0]}
    if tag == "r" and all(type(x) is int for x in rest):
        return range(*rest)
    raise ValueError("malformed result from the sandbox")
