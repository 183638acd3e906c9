"""Trusted side of the verdict: plans each assert into the parts only the program can compute ("holes")
and the rest, which the service evaluates itself on plain data, with the real standard library and a
bounded cost.

Only plain builtin data leaves the sandbox (None, bool, int, float, complex, str, bytes, tuple, list,
dict, set, frozenset, nested; exact types). Every operator, comparison and function of the test is
applied here, so a program can make a test pass only by producing the expected value: no object with
lying operators crosses, no patched module or builtin is consulted, no expected value is computed in
the sandbox. A test the service cannot evaluate this way is refused (an ERROR verdict that says why),
never trusted to the sandbox.

Names in a test mean what they mean in Python, decided from how the program and setup code bind them at
module level: a name they bind is the program's (a hole), except one bound only by importing a trusted
module or one of its members, which is the real one here; an unbound name is a builtin (the service's own),
a member of a trusted module the program star-imports, or else something the program may define at run
time (a hole). A builtin the program rebinds may be what the test calls (its entry point), but is refused
where it would judge the program's own values, and so is an expected value only the sandbox computes
(a module the program replaces, a name only test_setup_code defines, the program inside a comprehension).

Everything here runs on data a program chose, so everything is metered: values are sized, every C-level
operation is charged for the data it walks before it runs, and one operation, one program's tests and
integers all have a ceiling (EvaluationLimit), so no result can make the service compute for long or
hold the GIL.
"""
from __future__ import annotations

import ast
import builtins
import cmath
import collections
import functools
import itertools
import math
import operator
import re
import string
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

# Items (and 64-character pieces of text) the results of one program may hold, all its tests together;
# the harness stops at the same count, and decode() enforces it again.
MAX_RESULT_ITEMS = 100_000
MAX_RESULT_DEPTH = 100
# Ceilings of the evaluation here, in units of roughly one element visited by C code (~20-50 ns):
# one operation (so none holds the GIL for long), and all the tests of one program.
MAX_OPERATION_COST = 2_000_000
MAX_PROGRAM_COST = 20_000_000
MAX_INT_BITS = 1 << 16        # an integer's size: multiplying or dividing two stays in the milliseconds
MAX_TEXT_WIDTH = 10_000       # widths and precisions in format specifications, round()'s digits
STEP_COST = 30                # each node of a comprehension's body or a lambda's, per evaluation (measured ~0.8 µs)
TEXT_PER_UNIT = 16            # characters compared or hashed per unit (text built costs a unit per 4)
# pytest.approx defaults, which the paper's evaluation uses for floats.
REL_TOL, ABS_TOL = 1e-6, 1e-12
PLAN_CACHE_SIZE = 4096

PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


class NotATest(ValueError):
    """The test is not one assert statement in valid Python (the request is invalid)."""


class Unsupported(Exception):
    """A test the service cannot evaluate outside the sandbox; it is refused, never trusted."""


class EvaluationLimit(Exception):
    """Evaluating the test would cost more than the service spends on one program's data."""


class HoleError(Exception):
    """A sub-expression the sandbox computed raised; the test raises it where it uses the value."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


# --- Sizing and metering -------------------------------------------------------------------------

_meter = threading.local()


class Meter:
    """The cost budget of one program's tests, and the sizes of the values seen so far (by id; the values
    are kept alive with their size, so an id is never reused while it is here)."""

    def __init__(self, budget: int = MAX_PROGRAM_COST):
        self.left = budget
        self.sizes: dict[int, tuple[Any, int]] = {}

    def charge(self, units: int) -> None:
        if units > MAX_OPERATION_COST:
            raise EvaluationLimit(f"one operation of this test would visit about {units:,} elements; "
                                  f"the service visits at most {MAX_OPERATION_COST:,}")
        self.left -= units
        if self.left < 0:
            raise EvaluationLimit(f"this program's tests would cost the service more than {MAX_PROGRAM_COST:,} "
                                  "element visits to evaluate")

    def size(self, value: Any) -> int:
        """Elements a C function visits walking `value` (text counts its characters): the basis of every charge."""
        kind = type(value)
        if kind is int:
            return 1 + (value.bit_length() >> 10)
        if kind is str or kind is bytes:
            return 1 + len(value) // TEXT_PER_UNIT  # compared and hashed a machine word at a time
        if kind is range:
            return 1 + _iteration_length(value)
        if kind not in _CONTAINERS:
            return 1  # scalars, functions, types; lazy iterators charge as they are consumed
        known = self.sizes.get(id(value))
        if known is not None:
            return known[1]
        if kind in _MAPPINGS:
            total = 1 + sum(self.size(k) + self.size(v) for k, v in value.items())
        elif kind in _VIEWS:
            total = 1 + len(value) + sum(map(self.size, value))
        else:
            total = 1 + sum(map(self.size, value))
        self.sizes[id(value)] = (value, total)
        return total

    def record(self, value: Any, size: int) -> Any:
        if type(value) in _CONTAINERS:
            self.sizes[id(value)] = (value, size)
        return value

    def walk(self, *values: Any, factor: int = 1) -> int:
        """Charges for C code walking the values (`factor` times) and returns their total size."""
        total = sum(map(self.size, values))
        self.charge(total * factor)
        return total


_MAPPINGS = (dict, collections.Counter)
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = (list, tuple, set, frozenset, *_MAPPINGS, *_VIEWS)
_SEQUENCES = (str, bytes, list, tuple)


def _current() -> Meter:
    return _meter.meter


def _iteration_length(value: Any) -> int:
    """How many elements iterating `value` yields (0 for lazy iterators, charged as they run)."""
    try:
        return len(value) if type(value) in (*_CONTAINERS, str, bytes, range) else 0
    except OverflowError:  # a range longer than sys.maxsize
        return MAX_OPERATION_COST + 1


def _checked(value: Any) -> Any:
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise EvaluationLimit(f"an integer of {value.bit_length():,} bits; the service computes with at most "
                              f"{MAX_INT_BITS:,}")
    return value


# --- Comparison ----------------------------------------------------------------------------------

def approx_equal(actual: Any, expected: Any) -> bool:
    """pytest.approx(expected) == actual where the expected side holds a float (or complex), and == elsewhere:
    an exact expected value (an int, say) is compared exactly, inside containers too."""
    kind = type(expected)
    if kind is float or kind is complex:
        if actual == expected:
            return True
        if type(actual) not in (bool, int, float, complex) or math.isnan(abs(expected)) or math.isinf(abs(expected)):
            return False
        return abs(expected - actual) <= max(REL_TOL * abs(expected), ABS_TOL)
    if kind is list or kind is tuple:
        return (type(actual) is kind and len(actual) == len(expected)
                and all(map(approx_equal, actual, expected)))
    if kind is dict and type(actual) in _MAPPINGS:
        return actual.keys() == expected.keys() and all(approx_equal(actual[k], v) for k, v in expected.items())
    return actual == expected


def _compare_expected(op: type, expected_right: bool) -> Callable[[Any, Any], bool]:
    """== or != with the tolerance of approx_equal, the expected value on the side that has no hole."""
    if expected_right:
        equal = approx_equal
    else:
        def equal(expected, actual):
            return approx_equal(actual, expected)
    if op is ast.Eq:
        return equal
    return lambda a, b: not equal(a, b)


def _contains(container: Any, item: Any) -> bool:
    meter = _current()
    if type(container) is range and type(item) is int:
        return item in container  # arithmetic, not a walk
    if type(container) in (set, frozenset, dict, collections.Counter):
        meter.walk(item)
    else:
        meter.walk(container, item)
    return item in container


COMPARISONS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: _contains(b, a), ast.NotIn: lambda a, b: not _contains(b, a),
}
_WALKING_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


# --- Guarded operators ---------------------------------------------------------------------------

def _int_cost(a: int, b: int) -> int:
    return 1 + (a.bit_length() * b.bit_length() >> 14)


def _repeat(sequence: Any, times: Any) -> Any:
    if type(times) is bool:
        times = int(times)
    if type(times) is not int:
        return operator.mul(sequence, times)  # TypeError, as Python says it
    meter = _current()
    if type(sequence) in (str, bytes):
        meter.charge(len(sequence) * max(times, 0) // 4)
        return sequence * times
    size = meter.size(sequence) * max(times, 0)
    meter.charge(size)
    return meter.record(sequence * times, size)


def _multiply(a: Any, b: Any) -> Any:
    if type(a) in _SEQUENCES:
        return _repeat(a, b)
    if type(b) in _SEQUENCES:
        return _repeat(b, a)
    if type(a) is int and type(b) is int:
        if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise EvaluationLimit(f"a product of more than {MAX_INT_BITS:,} bits")
        _current().charge(_int_cost(a, b))
    return _checked(a * b)


def _power(a: Any, b: Any, modulus: Any = None) -> Any:
    if modulus is not None:
        if all(type(x) in (int, bool) for x in (a, b, modulus)):
            _current().charge(1 + b.bit_length() * (1 + (modulus.bit_length() ** 2 >> 12)))
        return pow(a, b, modulus)
    if type(a) in (int, bool) and type(b) in (int, bool) and b > 0 and abs(a) > 1:
        if (abs(a).bit_length() - 1) * b > MAX_INT_BITS:
            raise EvaluationLimit(f"a power of more than {MAX_INT_BITS:,} bits")
        _current().charge(1 + ((abs(a).bit_length() * b) ** 2 >> 20))
    return _checked(a ** b)


def _shift_left(a: Any, b: Any) -> Any:
    if type(a) in (int, bool) and type(b) in (int, bool) and a and b > MAX_INT_BITS:
        raise EvaluationLimit(f"a shift by more than {MAX_INT_BITS:,} bits")
    return _checked(a << b)


def _add(a: Any, b: Any) -> Any:
    if type(a) in _SEQUENCES or type(a) in _MAPPINGS:
        meter = _current()
        size = meter.walk(a, b)
        return meter.record(a + b, size)
    return _checked(a + b)


def _division(op: Callable) -> Callable[[Any, Any], Any]:
    def divide(a, b):
        if type(a) is int and type(b) is int:
            _current().charge(_int_cost(a, b))
        elif type(a) in (str, bytes):
            _format_string(a.decode("ascii", "replace") if type(a) is bytes else a)
            _current().walk(a, b, factor=4)
        return op(a, b)
    return divide


def _arithmetic(function, args, kwargs):
    if len(args) == 2 and type(args[0]) is int and type(args[1]) is int:
        _current().charge(_int_cost(*args))
    return function(*args, **kwargs)


def _walking(op: Callable) -> Callable[[Any, Any], Any]:
    """Set algebra, merges and the like: the result is no larger than what they walk."""
    def apply(a, b):
        meter = _current()
        size = meter.walk(a, b)
        return meter.record(_checked(op(a, b)), size)
    return apply


BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: _add, ast.Sub: _walking(operator.sub), ast.Mult: _multiply, ast.Div: _division(operator.truediv),
    ast.FloorDiv: _division(operator.floordiv), ast.Mod: _division(operator.mod), ast.Pow: _power,
    ast.LShift: _shift_left, ast.RShift: operator.rshift, ast.BitOr: _walking(operator.or_),
    ast.BitXor: _walking(operator.xor), ast.BitAnd: _walking(operator.and_), ast.MatMult: operator.matmul,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}


# --- Trusted functions ---------------------------------------------------------------------------

class Guarded:
    """A real standard-library callable behind its cost check; also what a test passes as a key or a mapped
    function, so C code never calls an unguarded function on program data."""
    __slots__ = ("function", "guard", "__name__")

    def __init__(self, function: Callable, guard: Callable):
        self.function, self.guard, self.__name__ = function, guard, getattr(function, "__name__", "function")

    def __call__(self, *args, **kwargs):
        return self.guard(self.function, args, kwargs)

    def __repr__(self):
        return f"<{self.__name__}>"


def _callable_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(map(_guarded_value, args)), {k: _guarded_value(v) for k, v in kwargs.items()}


def _guarded_value(value: Any) -> Any:
    """A callable handed to C code (a key, a mapped function) in its guarded form."""
    if callable(value) and not isinstance(value, (Guarded, Lambda)):
        guarded = TRUSTED_CALLS.get(value) if _hashable(value) else None
        if guarded is None:
            raise Unsupported(f"the service does not call {getattr(value, '__name__', type(value).__name__)}")
        return guarded
    return value


def _hashable(value: Any) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _one_argument(function, args, kwargs):
    if len(args) != 1 or kwargs:
        raise Unsupported(f"the service calls {function.__name__}() with one argument only")
    return function(*args)


def _cheap(function, args, kwargs):
    """Constant time on bounded values (len, isinstance, math on floats, ...)."""
    return _checked(function(*args, **kwargs))


def _walks(factor: int = 1, logarithmic: bool = False):
    """Walks its arguments (sorted: n log n); a container it returns is no larger than they are."""
    def guard(function, args, kwargs):
        meter = _current()
        args, kwargs = _callable_arguments(args, kwargs)
        total = sum(map(meter.size, args)) + sum(map(meter.size, kwargs.values()))
        length = max(map(_iteration_length, args), default=0)
        walked = max(total, length)  # iterating text makes an item per character
        meter.charge(walked * factor * (max(length, 2).bit_length() if logarithmic else 1))
        return meter.record(_checked(function(*args, **kwargs)), walked)
    return guard


def _sum(function, args, kwargs):
    start = args[1] if len(args) > 1 else kwargs.get("start", 0)
    if type(start) in (int, float, complex, bool):
        return _walks()(function, args, kwargs)
    # Adding sequences copies the running total once per item.
    items = args[0] if type(args[0]) in (*_CONTAINERS, range) else list(_iterated(args[0]))
    meter = _current()
    meter.charge(meter.size(items) * max(_iteration_length(items), 1))
    return _walks()(function, (items, *args[1:]), kwargs)


def _text_width(width: Any) -> None:
    if type(width) in (int, bool) and width > MAX_TEXT_WIDTH:
        raise EvaluationLimit(f"a text width of {width:,}; the service pads to at most {MAX_TEXT_WIDTH:,}")


def _padding(function, args, kwargs):
    _text_width(args[1] if len(args) > 1 else kwargs.get("width", 0))
    return _walks()(function, args, kwargs)


def _replace(function, args, kwargs):
    text, new = args[0], (args[2] if len(args) > 2 else b"" if type(args[0]) is bytes else "")
    _current().charge((len(text) + 1) * max(len(new) if type(new) in (str, bytes) else 1, 1))
    return _walks()(function, args, kwargs)


def _join(function, args, kwargs):
    separator, items = args[0], args[1] if len(args) > 1 else None
    items = list(items) if type(items) not in (list, tuple) else items  # a lazy argument is charged as it runs
    meter = _current()
    length = sum(len(item) if type(item) in (str, bytes) else 1 for item in items)
    meter.charge(length + len(separator) * max(len(items), 1))
    return function(separator, items)


def _rounding(function, args, kwargs):
    digits = args[1] if len(args) > 1 else kwargs.get("ndigits")
    if type(digits) in (int, bool) and abs(digits) > MAX_TEXT_WIDTH:
        raise EvaluationLimit(f"round() to {digits:,} digits; the service rounds to at most {MAX_TEXT_WIDTH:,}")
    return _cheap(function, args, kwargs)


def _bytes(function, args, kwargs):
    if args and type(args[0]) in (int, bool):
        _current().charge(args[0])
    return _walks()(function, args, kwargs)


def _bits_bound(bits: Callable[..., int]):
    """Integer functions whose result size is known from their arguments (factorial, comb, prod)."""
    def guard(function, args, kwargs):
        if all(type(a) in (int, bool) for a in args):
            predicted = bits(*args)
            if predicted > MAX_INT_BITS:
                raise EvaluationLimit(f"{function.__name__}() of more than {MAX_INT_BITS:,} bits")
            _current().charge(1 + (predicted ** 2 >> 16))
        return _walks()(function, args, kwargs)
    return guard


def _product_bits(iterable, *_, **__):
    return sum(max(abs(x).bit_length(), 1) for x in iterable if type(x) in (int, bool))


def _prod(function, args, kwargs):
    items = list(args[0]) if args else []
    _current().walk(items)
    if _product_bits(items) > MAX_INT_BITS:
        raise EvaluationLimit(f"prod() of more than {MAX_INT_BITS:,} bits")
    return _checked(function(items, *args[1:], **kwargs))


def _choose_bits(n, k=None):
    k = n if k is None else min(k, max(n - k, 0))
    return max(min(k, n), 0) * max(n.bit_length(), 1)


def _format_string(text: str) -> None:
    """A %-format or str.format() template: widths and precisions bounded, none taken from the arguments (`*`),
    and no attribute or item lookups inside replacement fields."""
    _formatting(text)
    fields = text.replace("{{", "").replace("}}", "")  # escaped braces are text
    if re.search(r"%[-#0 +\d.]*\*", text) or re.search(r"\{[^{}:!]*[.\[]|\{[^{}]*\{", fields):
        raise Unsupported(f"the service formats with fixed widths and plain fields only ({text[:80]!r})")


def _format_method(function, args, kwargs):
    _format_string(args[0])
    return _walks(4)(function, args, kwargs)


def _formatting(spec: str) -> str:
    if any(len(number) > len(str(MAX_TEXT_WIDTH)) for number in re.findall(r"\d+", spec)):
        raise EvaluationLimit(f"a format specification wider than {MAX_TEXT_WIDTH:,} ({spec!r})")
    return spec


def _format(function, args, kwargs):
    if len(args) > 1 and type(args[1]) is str:
        _formatting(args[1])
    return _walks()(function, args, kwargs)


_CONSUMERS_OF_ITERABLES = {"all", "any", "sum", "sorted", "list", "tuple", "set", "frozenset", "dict", "max", "min",
                           "enumerate", "zip", "map", "filter", "Counter", "prod", "fsum", "join"}

TRUSTED_BUILTINS: dict[str, tuple[Any, Callable]] = {
    "abs": (abs, _cheap), "all": (all, _walks()), "any": (any, _walks()), "bin": (bin, _walks()),
    "bool": (bool, _cheap), "bytes": (bytes, _bytes), "chr": (chr, _cheap), "complex": (complex, _walks()),
    "dict": (dict, _walks()), "divmod": (divmod, _arithmetic), "enumerate": (enumerate, _walks()),
    "filter": (filter, _walks()), "float": (float, _walks()), "format": (format, _format),
    "frozenset": (frozenset, _walks()), "hex": (hex, _walks()), "int": (int, _walks()),
    "isinstance": (isinstance, _cheap), "len": (len, _cheap), "list": (list, _walks()), "map": (map, _walks()),
    "max": (max, _walks()), "min": (min, _walks()), "oct": (oct, _walks()), "ord": (ord, _cheap),
    "pow": (pow, lambda _, args, kwargs: _power(*args, **kwargs)), "range": (range, _cheap),  # lazy: whoever walks it pays for its length
    "repr": (repr, _walks(4)), "reversed": (reversed, _walks()), "round": (round, _rounding),
    "set": (set, _walks()), "sorted": (sorted, _walks(logarithmic=True)), "str": (str, _walks(4)),
    "sum": (sum, _sum), "tuple": (tuple, _walks()), "type": (type, lambda function, args, kwargs: _one_argument(function, args, kwargs)), "zip": (zip, _walks()),
}

# Methods of plain data (and of what trusted functions return), none of which changes its object.
METHODS: dict[type, dict[str, Callable]] = {
    str: {**{name: _walks() for name in (
        "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
        "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isspace", "istitle", "isupper", "lower",
        "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip",
        "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper")},
        "encode": _walks(4), "replace": _replace, "join": _join, "format": _format_method,
        **{name: _padding for name in ("center", "ljust", "rjust", "zfill")}},
    bytes: {**{name: _walks() for name in (
        "count", "decode", "endswith", "find", "hex", "index", "isalnum", "isalpha", "isdigit", "lower", "lstrip",
        "rstrip", "split", "startswith", "strip", "upper")}, "replace": _replace, "join": _join},
    list: {"count": _walks(), "index": _walks()},
    tuple: {"count": _walks(), "index": _walks()},
    dict: {"keys": _cheap, "values": _cheap, "items": _cheap, "get": _walks()},
    collections.Counter: {"keys": _cheap, "values": _cheap, "items": _cheap, "get": _walks(),
                          "most_common": _walks(logarithmic=True), "total": _walks()},
    **{kind: {name: _walks() for name in ("union", "intersection", "difference", "symmetric_difference",
                                          "issubset", "issuperset", "isdisjoint")} for kind in (set, frozenset)},
    int: {"bit_length": _cheap, "bit_count": _cheap, "conjugate": _cheap},
    bool: {"bit_length": _cheap, "bit_count": _cheap, "conjugate": _cheap},
    float: {"is_integer": _cheap, "conjugate": _cheap, "hex": _cheap},
    complex: {"conjugate": _cheap},
}
# Plain attributes (not methods) of numbers.
NUMBER_ATTRIBUTES = {int: ("real", "imag", "numerator", "denominator"), bool: ("real", "imag", "numerator",
                     "denominator"), float: ("real", "imag"), complex: ("real", "imag")}
DATA_ATTRIBUTES = frozenset(itertools.chain(*(m.keys() for m in METHODS.values()), *NUMBER_ATTRIBUTES.values()))


def _module_members(module, guards: dict[str, Callable], default: Callable | None) -> dict[str, tuple[Any, Callable | None]]:
    members = {}
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if callable(value):
            guard = guards.get(name, default)
            if guard is not None:
                members[name] = (value, guard)
        elif type(value) in (int, float, complex, str):
            members[name] = (value, None)
    return members


_MATH_GUARDS = {
    "factorial": _bits_bound(lambda n: max(n, 1) * max(n.bit_length(), 1)),
    "comb": _bits_bound(_choose_bits), "perm": _bits_bound(_choose_bits),
    "lcm": _bits_bound(lambda *ints: sum(max(abs(i).bit_length(), 1) for i in ints)),
    "prod": _prod, "fsum": _walks(), "gcd": _walks(), "isqrt": _walks(), "dist": _walks(), "hypot": _walks(),
    "sumprod": _walks(),
}
# Modules whose members a test may use, each with the real object and its guard (None: a constant).
TRUSTED_MODULES: dict[str, dict[str, tuple[Any, Callable | None]]] = {
    "math": _module_members(math, _MATH_GUARDS, _cheap),
    "cmath": _module_members(cmath, {}, _cheap),
    "string": _module_members(string, {}, None),
    "collections": {"Counter": (collections.Counter, _walks())},
}
MODULE_OBJECTS = {"math": math, "cmath": cmath, "string": string, "collections": collections}


def _method_guard(kind: type, name: str) -> Callable | None:
    return METHODS.get(kind, {}).get(name)


def _unbound_method(kind: type, name: str) -> Guarded:
    """`str.lower` and the like, as a value a test can pass as a key."""
    guard = _method_guard(kind, name)

    def call(function, args, kwargs):
        if not args or type(args[0]) is not kind:
            raise TypeError(f"descriptor '{name}' requires a '{kind.__name__}' object")
        return guard(function, args, kwargs)
    return Guarded(getattr(kind, name), call)


TRUSTED_CALLS: dict[Any, Guarded] = {
    function: Guarded(function, guard)
    for function, guard in itertools.chain(
        TRUSTED_BUILTINS.values(),
        *((member for member in members.values() if member[1] is not None) for members in TRUSTED_MODULES.values()))
}
TRUSTED_CALLS[collections.Counter] = Guarded(collections.Counter, _walks())


def _attribute(value: Any, name: str) -> Any:
    """`value.name` for plain data: a guarded method or a number's attribute; nothing else is reachable."""
    kind = type(value)
    guard = _method_guard(kind, name)
    if guard is not None:
        method = getattr(value, name)
        return Guarded(method, lambda function, args, kwargs: guard(lambda *a, **k: function(*a[1:], **k),
                                                                    (value, *args), kwargs))
    if name in NUMBER_ATTRIBUTES.get(kind, ()):
        return getattr(value, name)
    if kind is type and _method_guard(value, name) is not None:
        return _unbound_method(value, name)
    if not name.startswith("_") and hasattr(value, name):
        raise Unsupported(f"the service does not evaluate {kind.__name__}.{name}")
    raise AttributeError(f"'{kind.__name__}' object has no attribute '{name}'")


def _call(function: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(function, (Guarded, Lambda)):
        return function(*args, **kwargs)
    guarded = TRUSTED_CALLS.get(function) if _hashable(function) else None
    if guarded is None:
        if callable(function):
            raise Unsupported(f"the service does not call {getattr(function, '__name__', type(function).__name__)}")
        raise TypeError(f"'{type(function).__name__}' object is not callable")
    return guarded(*args, **kwargs)


class Lambda:
    """A test's lambda, evaluated here: each call costs its body's steps."""
    __slots__ = ("parameters", "body", "scope", "cost", "__name__")

    def __init__(self, parameters: tuple[str, ...], body: Callable, scope: "Scope", cost: int):
        self.parameters, self.body, self.scope, self.cost, self.__name__ = parameters, body, scope, cost, "<lambda>"

    def __call__(self, *args):
        _current().charge(self.cost)
        if len(args) != len(self.parameters):
            raise TypeError(f"<lambda>() takes {len(self.parameters)} positional arguments but {len(args)} were given")
        return self.body(Scope(self.scope.holes, {**self.scope.names, **dict(zip(self.parameters, args))}))


# --- Which names mean what -------------------------------------------------------------------------

@dataclass(frozen=True)
class Bindings:
    """How the program and the setup code bind module-level names: name -> how ('trusted:math' for `import
    math`, 'trusted:math:floor' for `from math import floor`, 'program' or 'setup' for any other binding),
    and the modules they star-import."""
    names: dict[str, frozenset[str]]
    star_imports: frozenset[str] = frozenset()

    def resolve(self, name: str) -> str:
        """What a test's free name means: 'trusted:<module>[:<member>]' (the real one, here), 'builtin' (a
        trusted builtin), 'program' or 'setup' (computed in the sandbox), 'missing' (a trusted module nobody
        imported: NameError), 'refused' (a builtin the service does not evaluate) or 'unbound' (nothing the
        program binds visibly; it may define it at run time, so it is the program's)."""
        how = self.names.get(name)
        if how is not None:
            if len(how) == 1:
                (only,) = how
                if only.startswith("trusted:"):
                    return only
            return "setup" if how == {"setup"} else "program"
        for module in sorted(self.star_imports & TRUSTED_MODULES.keys()):
            if name in TRUSTED_MODULES[module]:
                return f"trusted:{module}:{name}"
        if name in TRUSTED_BUILTINS:
            return "builtin"
        if name in TRUSTED_MODULES:
            return "missing"
        if hasattr(builtins, name):
            return "refused"
        return "unbound"


NO_BINDINGS = Bindings({})


def names_bound_by(program: str, setup: str = "") -> Bindings:
    """The names the program and setup code bind in the module namespace the tests run in, and how: module-level
    statements and `global` declarations (a function's or class's own names are not the test's)."""
    names: dict[str, set[str]] = {}
    stars: set[str] = set()
    for source, other in ((program, "program"), (setup, "setup")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the program's own invalid escapes and the like
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for name, how in _module_bindings(tree, other, stars):
            names.setdefault(name, set()).add(how)
    return Bindings({name: frozenset(how) for name, how in names.items()}, frozenset(stars))


def _module_bindings(tree: ast.AST, other: str, stars: set[str]):
    """(name, how) for each binding of the module scope; walks into function and class bodies only for
    `global` declarations."""
    pending, module_scope = [(tree, True)], []
    while pending:
        node, at_module = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if at_module:
                yield node.name, other
            arguments = getattr(node, "args", None)
            evaluated_here = [*node.decorator_list, *getattr(node, "bases", ()), *getattr(node, "keywords", ()),
                              *(arguments.defaults if arguments else ()), *(arguments.kw_defaults if arguments else ())]
            pending.extend((child, at_module) for child in evaluated_here if child is not None)
            pending.extend((child, False) for child in node.body)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            # Their own names are local; a walrus inside still binds the enclosing scope.
            if at_module:
                module_scope.extend(n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr))
            continue
        if isinstance(node, ast.Global):
            yield from ((name, other) for name in node.names)
        elif at_module:
            yield from _bound_here(node, other, stars)
        pending.extend((child, at_module) for child in ast.iter_child_nodes(node))
    yield from ((name, other) for name in module_scope)


def _bound_here(node: ast.AST, other: str, stars: set[str]):
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        yield node.id, other
    elif isinstance(node, ast.Import):
        for alias in node.names:
            trusted = alias.name in TRUSTED_MODULES and (alias.asname or "." not in alias.name)
            yield alias.asname or alias.name.split(".")[0], f"trusted:{alias.name}" if trusted else other
    elif isinstance(node, ast.ImportFrom):
        for alias in node.names:
            if alias.name == "*":
                stars.add("" if node.level else node.module or "")
                continue
            members = None if node.level else TRUSTED_MODULES.get(node.module or "")
            trusted = members is not None and alias.name in members
            yield alias.asname or alias.name, f"trusted:{node.module}:{alias.name}" if trusted else other
    elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
        yield node.name, other
    elif isinstance(node, ast.MatchMapping) and node.rest:
        yield node.rest, other
    elif isinstance(node, ast.ExceptHandler) and node.name:
        yield node.name, other


# --- Plans ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hole:
    """A sub-expression the sandbox computes, and how its value is reported: 'value' (plain data only),
    'iterate' (a lazy value is consumed into a list) or 'all'/'any' (consumed up to the deciding item)."""
    source: str
    mode: str = "value"


class Scope:
    """What a compiled expression reads at run time: the holes' values and the test's own local names."""
    __slots__ = ("holes", "names")

    def __init__(self, holes: list, names: dict):
        self.holes, self.names = holes, names


@dataclass(frozen=True)
class TestPlan:
    """One assert: the holes the sandbox computes, in order, and how the service decides from their values."""
    source: str
    holes: tuple[Hole, ...]
    evaluate: Callable[[Scope], Any] | None
    refusal: str = ""

    def verdict(self, values: list[Any], meter: Meter) -> bool:
        if self.refusal:
            raise Unsupported(self.refusal)
        _meter.meter = meter
        try:
            return bool(self.evaluate(Scope(values, {})))
        finally:
            _meter.meter = None


def plan_test(source: str, bindings: Callable[[], Bindings], *, has_setup: bool = False) -> TestPlan:
    """Parses one `assert <expression>` and plans it. The program's bindings matter only for names that could
    mean something else than the program's (a builtin, a trusted module or its members) and, when there is
    setup code, for the names it defines, so `bindings` (the program's parse) is called only then. Plans are
    cached by the meaning of those names: the samples of one task share them."""
    expression, words = _parse_assert(source)
    if not has_setup and not (words & _MEANINGFUL_NAMES and _names_in(expression) & _MEANINGFUL_NAMES):
        return _plan(source, ())
    known = bindings()
    meanings = tuple(sorted((name, meaning) for name in _names_in(expression)
                            if (meaning := known.resolve(name)) != NO_BINDINGS.resolve(name)))
    return _plan(source, meanings)


_IDENTIFIER = re.compile(r"(?!\d)\w+")  # identifier-like words: a cheap first look


_MEANINGFUL_NAMES = frozenset(dir(builtins)) | frozenset(TRUSTED_MODULES) | frozenset(
    itertools.chain(*TRUSTED_MODULES.values()))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _parse_assert(source: str) -> tuple[ast.expr, frozenset[str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as error:
        raise NotATest(f"not valid Python: {getattr(error, 'msg', error)}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise NotATest("each test must be exactly one assert statement")
    return tree.body[0].test, frozenset(_IDENTIFIER.findall(source))  # a superset of its names, without a walk


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(source: str, meanings: tuple[tuple[str, str], ...]) -> TestPlan:
    planner = _Planner(source, dict(meanings))
    try:
        evaluate = planner.compile(_parse_assert(source)[0], frozenset(), "value")
    except Unsupported as refusal:
        return TestPlan(source, (), None, str(refusal))
    except RecursionError:
        return TestPlan(source, (), None, "the test is nested too deeply")
    return TestPlan(source, tuple(planner.holes), evaluate)


def _constant(value: Any) -> Callable[[Scope], Any]:
    return lambda scope: value


def _raising(error: Exception) -> Callable[[Scope], Any]:
    def evaluate(scope):
        raise error
    return evaluate


# Values a hole-free sub-expression may be folded into at plan time (immutable, or never changed here).
_FOLDABLE = (*PLAIN_TYPES, range, type, Guarded, Lambda)


class _Planner:
    """Compiles a test expression into closures over a Scope, recording the holes in evaluation order."""

    def __init__(self, source: str, meanings: dict[str, str]):
        self.lines = source.encode().splitlines(keepends=True)
        self.meanings = meanings
        self.from_setup = "setup" in meanings.values()
        self.holes: list[Hole] = []
        self.no_holes_reason = ""  # set inside comprehension bodies and lambdas
        self.shadowing: set[int] = set()  # holes that call a builtin or stdlib name the program rebinds
        self.meter = Meter()  # what folding the test's own constant parts may cost

    def meaning(self, name: str) -> str:
        return self.meanings.get(name) or NO_BINDINGS.resolve(name)

    # What the sandbox must compute --------------------------------------------------------------
    def is_program(self, node: ast.expr, scope: frozenset[str]) -> bool:
        """True when the node's value is the program's: a name it defines, or a call or attribute of one."""
        if isinstance(node, ast.Name):
            return node.id not in scope and self.meaning(node.id) in ("program", "setup", "unbound")
        if isinstance(node, ast.Call):
            return self.is_program(node.func, scope) or (
                isinstance(node.func, ast.Attribute) and self.is_program(node.func.value, scope)
                and node.func.attr not in DATA_ATTRIBUTES)
        if isinstance(node, ast.Attribute):
            return self.is_program(node.value, scope) and node.attr not in DATA_ATTRIBUTES
        return False

    def hole(self, node: ast.expr, scope: frozenset[str], mode: str) -> Callable[[Scope], Any]:
        if self.no_holes_reason:
            raise Unsupported(self.no_holes_reason)
        if scope and _names_in(node) & scope:
            raise Unsupported(f"`{self.source_of(node)}` uses the test's own variables inside the program's code")
        root = node
        while isinstance(root, (ast.Call, ast.Attribute)):
            root = root.func if isinstance(root, ast.Call) else root.value
        if root is not node and isinstance(root, ast.Name) and root.id in TRUSTED_MODULES:
            raise Unsupported(f"the program binds `{root.id}`, which the test uses as the standard {root.id} module")
        # The program may define a function named like a builtin and the test call it (its entry point), but a
        # builtin it rebinds never applies to the program's own values: that would let it judge itself.
        shadowing = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _MEANINGFUL_NAMES
        if shadowing and any(self.is_program(n, scope) for argument in (*node.args, *node.keywords)
                             for n in ast.walk(argument) if isinstance(n, ast.Name)):
            raise Unsupported(f"the program rebinds `{node.func.id}`, which the test applies to the program's values")
        if self.from_setup and (names := _names_in(node)) and all(self.meaning(name) == "setup" for name in names):
            raise Unsupported(f"`{self.source_of(node)}` comes only from test_setup_code, which runs inside the "
                              "sandbox; the service does not trust it as an expected value")
        index = len(self.holes)
        self.holes.append(Hole(self.source_of(node), mode))
        if shadowing:
            self.shadowing.add(index)

        def value(scope_: Scope):
            found = scope_.holes[index]
            if type(found) is HoleError:
                raise found
            return found
        return value

    def source_of(self, node: ast.expr) -> str:
        """The node's exact source text (offsets count UTF-8 bytes)."""
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return self.lines[first][node.col_offset:node.end_col_offset].decode()
        return (self.lines[first][node.col_offset:] + b"".join(self.lines[first + 1:last])
                + self.lines[last][:node.end_col_offset]).decode()

    # Compilation --------------------------------------------------------------------------------
    def compile(self, node: ast.expr, scope: frozenset[str], mode: str) -> Callable[[Scope], Any]:
        if self.is_program(node, scope):
            return self.hole(node, scope, mode)
        holes_before = len(self.holes)
        compiler = getattr(self, f"compile_{type(node).__name__}", None)
        if compiler is None:
            raise Unsupported(f"the service does not evaluate {type(node).__name__} expressions "
                              f"(`{self.source_of(node)}`)")
        evaluate = compiler(node, scope)
        if len(self.holes) == holes_before and not (scope and _names_in(node) & scope):
            return self.fold(evaluate)
        return evaluate

    def fold(self, evaluate: Callable[[Scope], Any]) -> Callable[[Scope], Any]:
        """A sub-expression without holes or local names is evaluated once, here, under the test's plan meter."""
        _meter.meter = self.meter
        try:
            value = evaluate(Scope([], {}))
        except Unsupported:
            raise
        except Exception as error:  # noqa: BLE001 - raised where Python would raise it, at verdict time
            return _raising(error)
        finally:
            _meter.meter = None
        return _constant(value) if isinstance(value, _FOLDABLE) else evaluate

    def compile_Constant(self, node, scope):
        return _constant(node.value)

    def compile_Name(self, node, scope):
        name = node.id
        if name in scope:
            return lambda s: s.names[name]
        meaning = self.meaning(name)
        if meaning == "builtin":
            return _constant(TRUSTED_BUILTINS[name][0])
        if meaning.startswith("trusted:"):
            _, module, *member = meaning.split(":")
            if member:
                return _constant(TRUSTED_MODULES[module][member[0]][0])
            return _constant(_Module(module))
        if meaning == "missing":
            return _raising(NameError(f"name '{name}' is not defined"))
        raise Unsupported(f"the service does not evaluate the builtin `{name}`")

    def compile_Attribute(self, node, scope):
        value = self.compile(node.value, scope, "value")
        attribute = node.attr

        def evaluate(s):
            target = value(s)
            if type(target) is _Module:
                return target.member(attribute)
            return _attribute(target, attribute)
        return evaluate

    def compile_Call(self, node, scope):
        function_node = node.func
        name = function_node.id if isinstance(function_node, ast.Name) else \
            function_node.attr if isinstance(function_node, ast.Attribute) else ""
        argument_mode = {"all": "all", "any": "any"}.get(name, "iterate" if name in _CONSUMERS_OF_ITERABLES else "value")
        function = self.compile(function_node, scope, "value")
        arguments = self.compile_elements(node.args, scope, argument_mode)
        keywords = [(k.arg, self.compile(k.value, scope, "value")) for k in node.keywords]

        def evaluate(s):
            callee = function(s)
            args = _expanded(arguments, s)
            kwargs = {}
            for key, argument in keywords:
                if key is None:
                    mapping = argument(s)
                    _current().walk(mapping)
                    kwargs.update(mapping)
                else:
                    kwargs[key] = argument(s)
            return _call(callee, tuple(args), kwargs)
        return evaluate

    def compile_Subscript(self, node, scope):
        value = self.compile(node.value, scope, "value")
        index = self.compile(node.slice, scope, "value")

        def evaluate(s):
            target, key = value(s), index(s)
            if type(target) not in (*_SEQUENCES, dict, collections.Counter, range):
                raise TypeError(f"'{type(target).__name__}' object is not subscriptable")
            meter = _current()
            if type(key) is slice:
                meter.walk(target)
            elif type(target) in _MAPPINGS:
                meter.walk(key)
            return target[key]
        return evaluate

    def compile_Slice(self, node, scope):
        parts = [self.compile(part, scope, "value") if part else _constant(None)
                 for part in (node.lower, node.upper, node.step)]
        return lambda s: slice(*(part(s) for part in parts))

    def compile_UnaryOp(self, node, scope):
        operand, apply = self.compile(node.operand, scope, "value"), UNARY[type(node.op)]
        return lambda s: _checked(apply(operand(s)))

    def compile_BinOp(self, node, scope):
        left, right = self.compile(node.left, scope, "value"), self.compile(node.right, scope, "value")
        apply = BINARY[type(node.op)]
        return lambda s: apply(left(s), right(s))

    def compile_BoolOp(self, node, scope):
        values = [self.compile(v, scope, "value") for v in node.values]
        stop_when = not isinstance(node.op, ast.And)  # `and` stops at a falsy value, `or` at a truthy one

        def evaluate(s):
            result = None
            for value in values:
                result = value(s)
                if bool(result) is stop_when:
                    return result
            return result
        return evaluate

    def compile_IfExp(self, node, scope):
        test, body, orelse = (self.compile(n, scope, "value") for n in (node.test, node.body, node.orelse))
        return lambda s: body(s) if test(s) else orelse(s)

    def compile_Compare(self, node, scope):
        operands, has_holes, shadowing = [], [], False
        for index, operand in enumerate([node.left, *node.comparators]):
            before = len(self.holes)
            contained = index > 0 and type(node.ops[index - 1]) in (ast.In, ast.NotIn)
            operands.append(self.compile(operand, scope, "iterate" if contained else "value"))
            has_holes.append(len(self.holes) > before)
            shadowing |= bool(self.shadowing & set(range(before, len(self.holes))))
        if shadowing and sum(has_holes) > 1:
            raise Unsupported("the test compares the program's values with a builtin or standard-library name the "
                              "program rebinds")
        comparisons = []
        for index, op in enumerate(node.ops):
            left_holes, right_holes = has_holes[index], has_holes[index + 1]
            if type(op) in (ast.Eq, ast.NotEq) and left_holes != right_holes:
                compare = _compare_expected(type(op), expected_right=left_holes)
            else:
                compare = COMPARISONS[type(op)]
            comparisons.append((compare, type(op) in _WALKING_COMPARISONS))

        def evaluate(s):
            left = operands[0](s)
            for (compare, walks), operand in zip(comparisons, operands[1:]):
                right = operand(s)
                if walks:
                    _current().walk(left, right)
                if not compare(left, right):
                    return False
                left = right
            return True
        return evaluate

    def compile_elements(self, elements, scope, mode="value"):
        """(starred, evaluate) for the elements of a display or the arguments of a call; a starred one iterates."""
        return [(True, self.compile(e.value, scope, "iterate")) if isinstance(e, ast.Starred)
                else (False, self.compile(e, scope, mode)) for e in elements]

    def display(self, node, scope, build):
        elements = self.compile_elements(node.elts, scope)

        def evaluate(s):
            items = _expanded(elements, s)
            meter = _current()
            size = 1 + sum(map(meter.size, items))
            meter.charge(size)
            return meter.record(build(items), size)
        return evaluate

    def compile_List(self, node, scope):
        return self.display(node, scope, list)

    def compile_Tuple(self, node, scope):
        return self.display(node, scope, tuple)

    def compile_Set(self, node, scope):
        return self.display(node, scope, set)

    def compile_Dict(self, node, scope):
        entries = [(self.compile(k, scope, "value") if k is not None else None, self.compile(v, scope, "value"))
                   for k, v in zip(node.keys, node.values)]

        def evaluate(s):
            result, meter = {}, _current()
            for key, value in entries:
                if key is None:
                    mapping = value(s)
                    meter.walk(mapping)
                    result.update(mapping)
                else:
                    k = key(s)
                    meter.walk(k)
                    result[k] = value(s)
            return meter.record(result, meter.size(result))
        return evaluate

    def compile_JoinedStr(self, node, scope):
        parts = [self.compile(v, scope, "value") for v in node.values]

        def evaluate(s):
            pieces = [part(s) for part in parts]
            _current().charge(sum(map(len, pieces)))
            return "".join(pieces)
        return evaluate

    def compile_FormattedValue(self, node, scope):
        value = self.compile(node.value, scope, "value")
        spec = self.compile(node.format_spec, scope, "value") if node.format_spec else _constant("")
        convert = {-1: None, ord("s"): str, ord("r"): repr, ord("a"): ascii}[node.conversion]

        def evaluate(s):
            v, meter = value(s), _current()
            meter.walk(v, factor=4)
            if convert:
                v = convert(v)
            return format(v, _formatting(spec(s)))
        return evaluate

    def compile_Lambda(self, node, scope):
        arguments = node.args
        if arguments.posonlyargs or arguments.vararg or arguments.kwonlyargs or arguments.kwarg or arguments.defaults:
            raise Unsupported("a test's lambda may only take plain positional parameters")
        parameters = tuple(a.arg for a in arguments.args)
        body = self.compile_without_holes(node.body, scope | set(parameters), "a lambda")
        cost = STEP_COST * (1 + _nodes_in(node.body))
        return lambda s: Lambda(parameters, body, s, cost)

    def compile_without_holes(self, node, scope, what):
        outer, self.no_holes_reason = self.no_holes_reason, (
            f"{what} in a test may not call the program (only a comprehension's first iterable may)")
        try:
            return self.compile(node, frozenset(scope), "value")
        finally:
            self.no_holes_reason = outer

    def comprehension(self, node, scope, elements: list[ast.expr]):
        """The first iterable is evaluated where the comprehension stands (it may be the program's value);
        the rest runs here for each item, without the program."""
        generators = node.generators
        if any(g.is_async for g in generators):
            raise Unsupported("asynchronous comprehensions")
        first = self.compile(generators[0].iter, scope, "iterate")
        inner = set(scope)
        compiled = []
        for index, generator in enumerate(generators):
            targets = _target_names(generator.target)
            iterable = first if index == 0 else self.compile_without_holes(generator.iter, inner, "a comprehension")
            inner |= targets
            conditions = [self.compile_without_holes(c, inner, "a comprehension") for c in generator.ifs]
            # What each item of this level evaluates: its conditions and the next level's iterable, or the elements.
            then = [generators[index + 1].iter] if index + 1 < len(generators) else elements
            cost = STEP_COST * (1 + sum(map(_nodes_in, [generator.target, *generator.ifs, *then])))
            compiled.append((generator.target, iterable, conditions, cost))
        bodies = [self.compile_without_holes(e, inner, "a comprehension") for e in elements]

        def run(s):
            local = Scope(s.holes, dict(s.names))
            meter = _current()

            def loop(level):
                if level == len(compiled):
                    yield [body(local) for body in bodies]
                    return
                target, iterable, conditions, cost = compiled[level]
                source = iterable(s if level == 0 else local)
                for item in _iterated(source):
                    meter.charge(cost)
                    _assign(target, item, local.names)
                    if all(condition(local) for condition in conditions):
                        yield from loop(level + 1)
            return loop(0)
        return run

    def collected(self, node, scope, elements, build):
        run = self.comprehension(node, scope, elements)

        def evaluate(s):
            meter, size = _current(), 1
            items = []
            for values in run(s):
                size += sum(map(meter.size, values))
                items.append(values)
            return meter.record(build(items), size)
        return evaluate

    def compile_ListComp(self, node, scope):
        return self.collected(node, scope, [node.elt], lambda items: [v for (v,) in items])

    def compile_SetComp(self, node, scope):
        return self.collected(node, scope, [node.elt], lambda items: {v for (v,) in items})

    def compile_DictComp(self, node, scope):
        return self.collected(node, scope, [node.key, node.value], lambda items: {k: v for k, v in items})

    def compile_GeneratorExp(self, node, scope):
        run = self.comprehension(node, scope, [node.elt])
        return lambda s: (v for (v,) in run(s))


class _Module:
    """A trusted module as a test sees it: only its listed members are reachable."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def member(self, attribute: str) -> Any:
        members = TRUSTED_MODULES[self.name]
        if attribute not in members:
            if hasattr(MODULE_OBJECTS[self.name], attribute) and not attribute.startswith("_"):
                raise Unsupported(f"the service does not evaluate {self.name}.{attribute}")
            raise AttributeError(f"module '{self.name}' has no attribute '{attribute}'")
        return members[attribute][0]


def _expanded(elements: list[tuple[bool, Callable[[Scope], Any]]], scope: Scope) -> list:
    items = []
    for starred, element in elements:
        if starred:
            items.extend(_iterated(element(scope)))
        else:
            items.append(element(scope))
    return items


def _nodes_in(node: ast.expr) -> int:
    return sum(isinstance(n, ast.expr) for n in ast.walk(node))


def _names_in(node: ast.expr) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)) and not any(isinstance(e, ast.Starred) for e in target.elts):
        return set().union(*map(_target_names, target.elts))
    raise Unsupported("a comprehension may only assign plain names and tuples of them")


def _assign(target: ast.expr, value: Any, names: dict) -> None:
    if isinstance(target, ast.Name):
        names[target.id] = value
        return
    items = list(_iterated(value))
    if len(items) != len(target.elts):
        raise ValueError(f"cannot unpack {len(items)} values into {len(target.elts)} names")
    for element, item in zip(target.elts, items):
        _assign(element, item, names)


def _iterated(value: Any):
    """Iterates a value here: a container is charged for its length up front, a lazy one as it runs."""
    if type(value) in (*_CONTAINERS, str, bytes, range):
        _current().charge(_iteration_length(value))
    elif not hasattr(value, "__next__"):
        raise TypeError(f"'{type(value).__name__}' object is not iterable")
    return value


# --- Values from the sandbox ---------------------------------------------------------------------

_SCALARS = {"n": None, "T": True, "F": False}
_COLLECTIONS = {"l": list, "t": tuple, "S": set, "Z": frozenset}


class ResultTooLarge(ValueError):
    """The program's results hold more than the service decodes."""


def decode_hole(tagged: Any, meter: Meter, budget: list[int]) -> Any:
    """Rebuilds one hole's value (or the HoleError it raised) from the sandbox's tagged JSON, sizing it for the
    meter; `budget` counts down the items the program's results may still hold. Anything malformed raises
    ValueError: what the sandbox sends is the program's to forge."""
    if type(tagged) is list and len(tagged) == 3 and tagged[0] == "E" and all(type(p) is str for p in tagged[1:]):
        return HoleError(tagged[1][:200], tagged[2][:2000])
    try:
        return _decode(tagged, meter, budget, 0)[0]
    except (OverflowError, TypeError, RecursionError) as error:
        raise ValueError(f"malformed result from the sandbox ({type(error).__name__})") from None


def _decode(tagged: Any, meter: Meter, budget: list[int], depth: int) -> tuple[Any, int]:
    budget[0] -= 1
    if budget[0] < 0:
        raise ResultTooLarge(f"the results hold more than {MAX_RESULT_ITEMS:,} items (or 64-character pieces "
                             "of text) in all")
    if depth > MAX_RESULT_DEPTH:
        raise ValueError(f"the results nest deeper than {MAX_RESULT_DEPTH}")
    if type(tagged) is not list or not tagged or type(tagged[0]) is not str:
        raise ValueError("malformed result from the sandbox")
    tag, count = tagged[0], len(tagged)
    if count == 1 and tag in _SCALARS:
        return _SCALARS[tag], 1
    if count == 2:
        payload = tagged[1]
        kind = type(payload)
        if tag == "i" and kind is str and len(payload) <= MAX_INT_BITS // 4 + 1:
            value = int(payload, 16)  # ValueError if not hexadecimal
            return value, meter.size(value)
        if tag == "f" and kind is str and len(payload) < 64:
            return float.fromhex(payload), 1
        if tag == "s" and kind is str:
            budget[0] -= len(payload) // 64
            return payload, meter.size(payload)
        if tag == "b" and kind is str:
            budget[0] -= len(payload) // 64
            value = bytes.fromhex(payload)
            return value, meter.size(value)
        if tag in _COLLECTIONS and kind is list:
            items, size = [], 1
            for item in payload:
                value, item_size = _decode(item, meter, budget, depth + 1)
                items.append(value)
                size += item_size
            try:
                value = _COLLECTIONS[tag](items)
            except TypeError:
                raise ValueError("unhashable item in a set from the sandbox") from None
            return meter.record(value, size), size
        if tag == "d" and kind is list:
            result, size = {}, 1
            for entry in payload:
                if type(entry) is not list or len(entry) != 2:
                    raise ValueError("malformed dict entry from the sandbox")
                key, key_size = _decode(entry[0], meter, budget, depth + 1)
                value, value_size = _decode(entry[1], meter, budget, depth + 1)
                try:
                    result[key] = value
                except TypeError:
                    raise ValueError("unhashable dict key from the sandbox") from None
                size += key_size + value_size
            return meter.record(result, size), size
    if count == 3 and tag == "c" and all(type(p) is str and len(p) < 64 for p in tagged[1:]):
        return complex(float.fromhex(tagged[1]), float.fromhex(tagged[2])), 1
    raise ValueError("malformed result from the sandbox")
