"""What a failed comparison compared, for the people and models who write feedback: the program's value
and the value the test held it against (`assert f(2) == 4` that fails: actual `3`, expected `4`).

Only shown, never judged: the verdict is the checks' alone.
"""
from __future__ import annotations

import ast

SHOWN_CHARS = 500


def shown(value) -> str:
    """A value's repr, capped (int's repr refuses very long numbers)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def compared(test: str, hole_sources: list[str], values: list) -> tuple[str, str]:
    """(actual, expected) of a test that is one comparison whose sides are each a sub-expression the sandbox
    computed (a hole) or a literal, at least one a hole; ("", "") for any other test."""
    try:
        node = ast.parse(test).body[0].test
    except (SyntaxError, ValueError, IndexError, AttributeError):
        return "", ""
    if not isinstance(node, ast.Compare) or len(node.ops) != 1:
        return "", ""
    sides = []
    for side in (node.left, node.comparators[0]):
        source = ast.get_source_segment(test, side)
        if source in hole_sources:
            sides.append((True, values[hole_sources.index(source)]))
            continue
        try:
            sides.append((False, ast.literal_eval(side)))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return "", ""
    (left_is_program, left), (right_is_program, right) = sides
    if not (left_is_program or right_is_program):
        return "", ""
    actual, expected = (right, left) if right_is_program and not left_is_program else (left, right)
    return shown(actual), shown(expected)
