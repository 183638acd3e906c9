"""A tiny model that has learnt a few answers by heart, so the comparison's every method has something to train on.

A random tiny model never writes a passing program, so on it ILF, rejection sampling and the rounds would only
ever report "nothing to fine-tune". This one (the tests' tiny model, overfitted for a minute on a handful of
pairs) writes, for the first two annotated MBPP_Train tasks A and B (311 and 315):
- A's gold body after A's generation prompt (so rejection sampling finds a passing sample);
- a failing body after B's generation prompt (so collecting its failures queues B);
- a passing body (A's gold, B's a two-line repair: MBPP's gold of 315 is too long for a model this small) after
  any refinement prompt of A or B: the paper's failing program with the paper's feedback or
  with the feedback it writes itself, and its own failing program with that feedback (so pi_Refine repairs);
- short feedback after the feedback prompt of B's own failing program and of the paper's failing programs of A and
  B, each with its test results (so model-written feedback on them is the feedback pi_Refine learnt to repair with).
Everything else it writes is as random as the tiny model's.
"""
from __future__ import annotations

from pathlib import Path

WRONG_BODY = "    return None\n"
MODEL_FEEDBACK = "Fix it."
# Task 315, find_Max_Len_Even: the first longest word of even length, else "-1"
B_REPAIR = '\n    words = [w for w in str.split(" ") if len(w) % 2 == 0]\n    return max(words, key=len) if words else "-1"\n'


def training_pairs() -> list[dict]:
    from ilf import data, prompts, tasksets
    from services.execution.executor import Executor, Program
    from services.execution.server import to_response
    from services.feedback.writer import feedback_prompt
    mbpp = tasksets.mbpp()
    a, b = (mbpp.task(note.task_id) for note in data.annotations("train")[:2])
    notes = {note.task_id: note for note in data.annotations("train")[:2]}

    repairs = {a.task_id: prompts.completion_after(prompts.reference_program(a), prompts.task_prompt(a)),
               b.task_id: B_REPAIR}
    pairs = [{"prompt": prompts.task_prompt(a), "completion": repairs[a.task_id]},
             {"prompt": prompts.task_prompt(b), "completion": WRONG_BODY}]
    for task in (a, b):
        prompt, note = prompts.task_prompt(task), notes[task.task_id]
        own_failures = [(prompt + body, MODEL_FEEDBACK) for body in (WRONG_BODY, WRONG_BODY.rstrip())]
        for old, feedback in [(note.failing_program, note.feedback), (note.failing_program, MODEL_FEEDBACK),
                              *own_failures]:
            pairs.append({"prompt": prompts.refinement_prompt(old, feedback, prompt),
                          "completion": repairs[task.task_id]})
    # The feedback service shows the model the failing program's real test results, so they are learnt with it.
    # Whether the collected program keeps the body's last newline is the engine's business: both are learnt.
    failing_programs = [(b, prompts.task_prompt(b) + WRONG_BODY), (b, prompts.task_prompt(b) + WRONG_BODY.rstrip()),
                        *((task, notes[task.task_id].failing_program) for task in (a, b))]
    executor = Executor()
    try:
        for task, failing in failing_programs:
            result = to_response(executor.execute(Program(failing, tuple(task.tests), task.test_setup_code)))
            pairs.append({"prompt": feedback_prompt(task, failing, result, shots=2), "completion": MODEL_FEEDBACK})
    finally:
        executor.close()
    return pairs


def build_memorizing_model(tiny_model_dir: Path, target: Path, max_steps: int = 400) -> Path:
    """Full fine-tuning of the tiny model on training_pairs() until it repeats them (loss on the completion only)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import tokenize
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples, _ = tokenize(tokenizer, training_pairs(), 4096)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(max_steps):
        total = 0.0
        for example in examples:
            start = next(i for i, label in enumerate(example.labels) if label != -100)
            hidden = model.model(input_ids=torch.tensor([example.input_ids])).last_hidden_state[0, start - 1:-1]
            # The output layer on the completion's positions only: the vocabulary is most of the cost.
            loss = F.cross_entropy(model.lm_head(hidden), torch.tensor(example.input_ids[start:]))
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        if total < 0.01 * len(examples):
            break
    else:
        raise RuntimeError(f"the tiny model did not learn its answers in {max_steps} steps (loss {total:.3f})")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
