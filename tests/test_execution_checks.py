"""The service's side of the verdict on its own, without a sandbox: how a test's names are resolved, that whatever
a sandbox sends decodes to plain data or fails as ValueError, and that a malformed reply is that program's ERROR."""
from __future__ import annotations

import json
import random

import pytest

from services.execution.checks import Meter, decode_hole, names_bound_by, plan_test
from services.execution.executor import Verdict, decide


@pytest.mark.parametrize("program, name, meaning", [
    ("def sum(a, b): return a + b", "sum", "program"),
    ("def f(sorted): return sorted", "sorted", "builtin"),             # a parameter is the function's own
    ("def f():\n    max = 1\n    return max", "max", "builtin"),      # so is a local
    ("def f():\n    global max\n    max = 1", "max", "program"),      # a global declaration is the module's
    ("class C:\n    len = 3", "len", "builtin"),                      # a class attribute is the class's
    ("for sorted in []: pass", "sorted", "program"),
    ("[min for min in range(3)]", "min", "builtin"),                  # a comprehension's variable is its own
    ("[(abs := 1) for _ in range(3)]", "abs", "program"),             # but a walrus binds the module's
    ("import math", "math", "trusted:math"),
    ("import math as m", "m", "trusted:math"),
    ("import cmath as math", "math", "trusted:cmath"),
    ("import math\nmath = 5", "math", "program"),
    ("import os.path", "os", "program"),
    ("from math import floor", "floor", "trusted:math:floor"),
    ("from math import floor as sorted", "sorted", "trusted:math:floor"),
    ("from mymath import floor", "floor", "program"),
    ("from math import *", "floor", "trusted:math:floor"),
    ("from os import *", "floor", "unbound"),
    ("x = 1", "math", "missing"),
    ("x = 1", "print", "refused"),
    ("x = 1", "helper", "unbound"),
])
def test_a_tests_names_mean_what_the_program_makes_them_mean(program, name, meaning):
    assert names_bound_by(program).resolve(name) == meaning


def test_setup_names_are_the_setups():
    bindings = names_bound_by("def f(x): return x", "expected = 3\nf = f")
    assert bindings.resolve("expected") == "setup" and bindings.resolve("f") == "program"


def _valid(rng: random.Random, depth: int = 0):
    """A well-formed tagged value (what an honest harness sends)."""
    kind = rng.choice("nTFifsbc" + ("ltSZd" if depth < 4 else ""))
    if kind in "nTF":
        return [kind]
    if kind == "i":
        return ["i", format(rng.randrange(-2**80, 2**80), "x")]
    if kind == "f":
        return ["f", rng.uniform(-1e9, 1e9).hex()]
    if kind == "c":
        return ["c", rng.random().hex(), rng.random().hex()]
    if kind == "s":
        return ["s", "".join(rng.choice("ab\u00e9\n") for _ in range(rng.randrange(5)))]
    if kind == "b":
        return ["b", bytes(rng.randrange(256) for _ in range(rng.randrange(4))).hex()]
    if kind == "d":
        return ["d", [[["i", format(rng.randrange(99), "x")], _valid(rng, depth + 1)] for _ in range(rng.randrange(3))]]
    if kind in "SZ":
        return [kind, [["s", str(rng.randrange(9))] for _ in range(rng.randrange(3))]]
    return [kind, [_valid(rng, depth + 1) for _ in range(rng.randrange(4))]]


def _random_json(rng: random.Random, depth: int = 0):
    """A well-formed value, one with a part replaced by anything JSON can say, or plain noise."""
    if depth == 0 and rng.random() < 0.5:
        return _valid(rng) if rng.random() < 0.5 else _mutated(rng, _valid(rng))
    choice = rng.randrange(10 if depth < 6 else 5)
    if choice == 0:
        return rng.choice(["n", "T", "F", "i", "f", "s", "b", "c", "l", "t", "S", "Z", "d", "E", "x", ""])
    if choice == 1:
        return rng.choice([0, -1, 2**70, 1.5, float("inf"), True, None])
    if choice == 2:
        return rng.choice(["ff", "-1a", "0x1p3", "zz", "0x1p99999", "", "\u00e9"])
    if choice in (3, 4):
        return [rng.choice(["i", "f", "s", "b", "l", "d", "S", "E", "c", "T"])] + [
            _random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _mutated(rng: random.Random, value):
    if isinstance(value, list) and value and rng.random() < 0.7:
        index = rng.randrange(len(value))
        return [*value[:index], _mutated(rng, value[index]), *value[index + 1:]]
    return _random_json(rng, 3)


PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def _plain(value) -> bool:
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value) in PLAIN and all(map(_plain, value))
    if isinstance(value, dict):
        return type(value) is dict and all(_plain(k) and _plain(v) for k, v in value.items())
    return type(value) in PLAIN


def test_anything_a_sandbox_sends_decodes_to_plain_data_or_fails_as_value_error():
    rng = random.Random(14)
    decoded = failed = 0
    for _ in range(20_000):
        tagged = json.loads(json.dumps(_random_json(rng)))
        meter = Meter()
        try:
            value = decode_hole(tagged, meter, [100_000])
        except ValueError:
            failed += 1
            continue
        decoded += 1
        assert type(value).__name__ == "HoleError" or _plain(value), (tagged, value)
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            assert meter.sizes[id(value)][1] >= Meter().size(value)  # decode never records less than the meter finds
    assert decoded > 1000 and failed > 1000


GOOD_REPLY = {"results": '{"test": 0, "values": [["i", "4"]]}\n', "arrivals": [0.001], "results_truncated": False,
              "timed_out": False, "signal": 0, "exit_code": 0, "duration_s": 0.01, "stdout": "", "stderr": "",
              "output_truncated": False}


@pytest.mark.parametrize("change", [
    {"results": None}, {"results": 5}, {"arrivals": "0"}, {"arrivals": [None]}, {"arrivals": [[1]]},
    {"signal": True}, {"signal": "9"}, {"duration_s": "1"}, {"stdout": b"x"}, {"timed_out": 1},
    {"results": '{"test": 0, "values": [["i", "4"]]}\n' * 3, "arrivals": [0.001] * 3},
    {"results": "[" * 50_000 + "\n"}, {"results": '{"test": true, "values": []}\n'},
])
def test_a_malformed_reply_is_an_error_of_that_program_and_never_raises(change):
    plans = [plan_test("assert f(2) == 4", lambda: names_bound_by("def f(x): pass"))]
    assert decide(plans, GOOD_REPLY).passed
    outcome = decide(plans, {**GOOD_REPLY, **change})
    assert [t.verdict for t in outcome.tests] in ([Verdict.ERROR], [Verdict.PASSED]) and outcome.tests
    if any(key != "results" and key != "arrivals" for key in change):
        assert outcome.error_type == "SandboxFailure"


@pytest.mark.parametrize("reply", [None, [], "reply", {"results": ""}])
def test_a_reply_that_is_not_a_reply_is_a_sandbox_failure(reply):
    plans = [plan_test("assert f(2) == 4", lambda: names_bound_by("def f(x): pass"))]
    assert decide(plans, reply).tests[0].error_type == "SandboxFailure"
