"""Prompt formats against the authors' prompts shipped in the annotations file (see PAPER.md)."""
from ilf import data, prompts


def test_generation_prompt_matches_the_annotated_prompts():
    rows = data.annotations()
    mismatched = [a.task_id for a in rows if prompts.mbpp_prompt(data.task(a.task_id), strip=False) != a.prompt]
    # Two annotation rows carry mojibake where MBPP has a non-ASCII character; nothing else may differ.
    assert sorted(mismatched) == [260, 679]
    for task_id in mismatched:
        ours = prompts.mbpp_prompt(data.task(task_id), strip=False)
        theirs = next(a.prompt for a in rows if a.task_id == task_id)
        assert ours.encode("ascii", "ignore") == theirs.encode("ascii", "ignore").replace(b"\xef\xbf\xbd", b"")


def test_generation_prompt_layout():
    prompt = prompts.generation_prompt("Add two numbers.", ["assert add(1, 2) == 3"], "import math\ndef add(a, b):")
    assert prompt == '"""\nAdd two numbers.\n\n>>> Example: add(1, 2) = 3\n"""\n\nimport math\ndef add(a, b):\n'
    stripped = prompts.generation_prompt("Add two numbers.", ["assert add(1, 2) == 3"], "def add(a, b):", strip=True)
    assert stripped.endswith("def add(a, b):")


def test_code_prefix_keeps_imports_and_helpers_before_the_target_function():
    gold = "import re\r\nR = 3\r\ndef helper(x):\r\n  return x\r\ndef target(a,\r\n           b): \r\n  return a"
    assert prompts.code_prefix(gold, "target") == "import re\nR = 3\ndef helper(x):\n  return x\ndef target(a,\n           b):"
    assert prompts.entry_point(["assert int(target(1, 2)) == 1"], gold) == "target"


def test_every_mbpp_task_has_a_prompt():
    assert len({t.task_id: prompts.mbpp_prompt(t) for t in data.mbpp().values()}) == 974


def test_refinement_prompt_layout():
    assert prompts.refinement_prompt("def f():\n    return 1", "Return 2.", "GEN") == \
        "OLD CODE:\ndef f():\n    return 1\n\nFEEDBACK:\nReturn 2.\n\nREFINEMENT:\nGEN"


def test_truncate_completion_cuts_at_end_of_text_and_new_top_level_lines():
    body = "\n    x = 1\n\n    return x\nprint(f())\n"
    assert prompts.truncate_completion(body) == "\n    x = 1\n\n    return x"
    assert prompts.truncate_completion("\n    return 1<|endoftext|>junk") == "\n    return 1"
    assert prompts.truncate_completion("\n    return 1\n# test\n") == "\n    return 1"
    assert prompts.truncate_completion('\n    return 1\n"""doc"""') == "\n    return 1"
    assert prompts.truncate_completion("\n    return 1\n    ") == "\n    return 1\n    "


def test_completion_after():
    assert prompts.completion_after("PROMPT body", "PROMPT") == " body"


def test_stop_sequences_end_sampling_exactly_where_the_completion_is_cut():
    samples = ["\n    return 1\nprint(f())", "\n    x = 2\n\n    return x\n# done", "\n    y = 'a'\n\"doc\"",
               "\n    return [\n1]\nassert f() == 1", "\n    return 2<|endoftext|>more", "\n    pass\n    \n"]
    for sample in samples:
        cut = min((sample.find(s) for s in prompts.STOP_SEQUENCES if s in sample), default=len(sample))
        assert sample[:cut] == prompts.truncate_completion(sample)
