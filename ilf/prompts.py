"""The paper's prompt formats, as the authors' code builds them, and completion post-processing."""
from __future__ import annotations

import ast
import re
import string
import warnings

# The model completes the function body; the output ends at the first later line that
# starts at column 0 with a letter, '#' or a quote (a new top-level statement).
_TOP_LEVEL_LINE = re.compile(r"\n(?=[A-Za-z#'\"])")

END_OF_TEXT = "<|endoftext|>"
# The paper cuts the old code to 512 tokens so the prompt fits 1024. Cutting by characters (about three
# per token of Python) lets clients without a tokenizer build the very prompt the service samples from.
REFINEMENT_OLD_CODE_CHARS = 1536


def _parse(source: str) -> ast.Module:
    with warnings.catch_warnings():  # MBPP's programs have invalid escapes such as '\d' in plain strings
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


def entry_point(tests: list[str] | tuple[str, ...], program: str) -> str:
    """Name of the first function the tests call (in reading order) that the program defines.

    Parsed, not matched with regular expressions: tests and programs may come from users, and a pattern
    such as `name(` backtracks quadratically on a long run of word characters."""
    try:
        defined = {node.name for node in ast.walk(_parse(program))
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"the program does not parse: {error}") from None
    for test in tests:
        try:
            calls = [node for node in ast.walk(_parse(test))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        except (SyntaxError, ValueError):
            continue
        for call in sorted(calls, key=lambda node: (node.lineno, node.col_offset)):
            if call.func.id in defined:
                return call.func.id
    raise ValueError(f"the tests call no function the program defines: {tests[:1]}")


def split_gold(gold_program: str, function_name: str) -> tuple[str, str]:
    """(code prefix, body): the gold program up to and including the target function's `def` line
    (keeping any imports or helpers before it, as the authors' code does), and the rest."""
    lines = gold_program.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if re.match(rf"\s*def\s+{re.escape(function_name)}\s*\(", line):
            end = i
            while not lines[end].rstrip().endswith(":") and end + 1 < len(lines):
                end += 1  # a signature spread over several lines
            prefix = "\n".join(lines[:i] + [h.rstrip() for h in lines[i:end + 1]])
            return prefix, "\n".join(lines[end + 1:])
    raise ValueError(f"no `def {function_name}` in the gold program")


def code_prefix(gold_program: str, function_name: str) -> str:
    return split_gold(gold_program, function_name)[0]


def signature_from_tests(function_name: str, tests: list[str] | tuple[str, ...]) -> str:
    """A `def` line for a task with only an entry point: the parameters of the first call the tests make
    (positional ones named a, b, c, ...; keyword ones by their keyword)."""
    for test in tests:
        for node in ast.walk(_parse(test)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function_name:
                positional = [chr(ord("a") + i) if i < 26 else f"x{i}" for i in range(len(node.args))]
                return f"def {function_name}({', '.join(positional + [k.arg for k in node.keywords if k.arg])}):"
    raise ValueError(f"no test calls {function_name}()")


def example_line(first_test: str) -> str:
    """The first assert shown as an example: `assert ` removed and `==` shown as `=`."""
    example = first_test.lstrip()
    if example.startswith("assert "):
        example = example[len("assert "):]
    return example.replace("==", "=")


def generation_prompt(text: str, tests: list[str] | tuple[str, ...], prefix: str, *, strip: bool = False) -> str:
    """The paper's generation prompt: the task as a docstring with one example, then the code prefix.

    strip=True leaves off the newline after the `def` line so the model writes the line break and
    indentation itself (on small BPE models this matters: see PAPER.md).
    """
    prompt = f'"""\n{text.strip()}\n\n>>> Example: {example_line(tests[0])}\n"""\n\n{prefix}\n'
    return prompt.rstrip() if strip else prompt


def refinement_prompt(failing_program: str, feedback: str, gen_prompt: str) -> str:
    """The paper's refinement prompt; the model continues with the repaired body."""
    old_code = failing_program[:REFINEMENT_OLD_CODE_CHARS]
    return f"OLD CODE:\n{old_code}\n\nFEEDBACK:\n{feedback.strip()}\n\nREFINEMENT:\n{gen_prompt}"


def truncate_completion(completion: str) -> str:
    """Cut a sampled body at end-of-text and at the first new top-level line."""
    completion = completion.split(END_OF_TEXT, 1)[0]
    match = _TOP_LEVEL_LINE.search(completion)
    return completion[: match.start()] if match else completion


# Sampling stops where truncate_completion would cut: at a new line starting at column 0 with a
# letter, '#' or a quote, or at end-of-text. Stopping there, rather than cutting a longer sample
# afterwards, saves every token a small model would spend writing tests or chatter after the body.
STOP_SEQUENCES = [f"\n{c}" for c in string.ascii_letters + "#'\""] + [END_OF_TEXT]


def task_prompt(task, *, strip: bool = True) -> str:
    """Generation prompt of a task of any task set (ilf.tasksets.Task): it ends with the task's code prefix."""
    return generation_prompt(task.text, task.tests, task.code_prefix, strip=strip)


def mbpp_prompt(task, *, strip: bool = True) -> str:
    """Generation prompt of an MBPP row (ilf.data.MBPPTask), its code prefix taken from the gold program."""
    prefix = code_prefix(task.code, entry_point(task.tests, task.code))
    return generation_prompt(task.text, task.tests, prefix, strip=strip)


def reference_program(task) -> str:
    """The task's reference solution (MBPP: the gold program) written after its full (unstripped) prompt:
    its lines after the entry point's `def` line follow the prompt."""
    body = split_gold(task.reference, task.entry_point or entry_point(task.tests, task.reference))[1]
    return task_prompt(task, strip=False) + body


def completion_after(program: str, prompt: str) -> str:
    """The part of a whole program that follows its prompt (the body a model should write)."""
    if not program.startswith(prompt):
        raise ValueError("the program does not start with the prompt")
    return program[len(prompt):]
