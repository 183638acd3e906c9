"""Model-written feedback (the paper's InstructGPT ablation): the prompt, and the call to the generation service."""
from __future__ import annotations

import grpc

from ilf import data, prompts
from ilf.errors import FailedPrecondition, InvalidArgument, upstream_error
from ilf.tasksets import Task
from ilf.v1 import common_pb2, execution_pb2, generation_pb2, generation_pb2_grpc

GENERATION_CALL_S = 600.0
DEFAULT_MAX_NEW_TOKENS = 256
# About the paper's 512-token cap on old code, so task, examples and program fit a small model's context.
MAX_PROMPT_PROGRAM_CHARS = 2000
# A test's assert, and what it got and expected, can be kilobytes of repr (MBPP 493's lists of float pairs made
# an 8,077-token prompt); the start says enough to write feedback from.
MAX_REPORTED_CHARS = 300
INSTRUCTION = "Explain briefly what is wrong with the old code and how to fix it."
# A new section header means the model has finished its feedback and started another example.
STOP_SEQUENCES = ["\nTASK:", "\nOLD CODE:", "\nTEST RESULTS:", "\nFEEDBACK:", prompts.END_OF_TEXT]


def _section(task_text: str, program: str) -> str:
    return f"TASK:\n{task_text.strip()}\n\nOLD CODE:\n{program.strip()[:MAX_PROMPT_PROGRAM_CHARS]}\n\n"


def _clipped(text: str) -> str:
    return text if len(text) <= MAX_REPORTED_CHARS else text[:MAX_REPORTED_CHARS] + " ..."


def results_report(task: Task, result: execution_pb2.ExecuteResponse) -> str:
    """One line per test: the assert and its verdict (or why the program did not load), long values clipped."""
    if result.error_type:
        return _clipped(f"The program did not load: {result.error_type}: {result.error_message}".strip())
    verdicts = {t.index: t for t in result.tests}
    lines = []
    for index, test in enumerate(task.tests):
        outcome = verdicts.get(index)
        verdict = execution_pb2.Verdict.Name(outcome.verdict).removeprefix("VERDICT_") if outcome else "NOT RUN"
        detail = f" ({outcome.error_type})" if outcome and outcome.error_type else ""
        if outcome and outcome.actual:
            detail += f" got {_clipped(outcome.actual)}" + (
                f", expected {_clipped(outcome.expected)}" if outcome.expected else "")
        lines.append(f"{_clipped(test.strip())}  # {verdict}{detail}")
    return "\n".join(lines)


def feedback_prompt(task: Task, program: str, result: execution_pb2.ExecuteResponse, shots: int = 0) -> str:
    """Few-shot examples (paper annotations of the unused prompt split, so no evaluated task leaks),
    then the task, the failing program and its test results; the model continues after FEEDBACK:."""
    examples = data.annotations("prompt")
    if not 0 <= shots <= len(examples):
        raise InvalidArgument(f"shots must be between 0 and {len(examples)}, got {shots}")
    parts = [f"{INSTRUCTION}\n\n"]
    for note in examples[:shots]:
        parts.append(_section(data.task(note.task_id).text, note.failing_program)
                     + f"FEEDBACK:\n{note.feedback.replace(chr(13), '').strip()}\n\n")
    parts.append(_section(task.text, program) + f"TEST RESULTS:\n{results_report(task, result)}\n\nFEEDBACK:\n")
    return "".join(parts)


class FeedbackWriter:
    """Asks the generation service for feedback on a failing program."""

    def __init__(self, generation: generation_pb2_grpc.GenerationStub, *, max_feedback_chars: int):
        self.generation = generation
        self.max_feedback_chars = max_feedback_chars   # longer model-written feedback is cut there

    def write(self, prompt: str, params: common_pb2.SamplingParams, model_version: str = "") -> tuple[str, str]:
        """Returns (feedback, the model version that wrote it); one sample whatever params.n says."""
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(params)
        sampling.n = 1
        sampling.max_new_tokens = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        del sampling.stop[:]
        sampling.stop.extend(STOP_SEQUENCES)
        try:
            reply = self.generation.Generate(
                generation_pb2.GenerateRequest(prompt=prompt, params=sampling, model_version=model_version),
                timeout=GENERATION_CALL_S)
        except grpc.RpcError as error:
            raise upstream_error("generation", error) from None
        feedback = reply.completions[0].text.strip()[:self.max_feedback_chars]
        if not feedback:
            raise FailedPrecondition(f"model {reply.model_version} wrote no feedback (only whitespace)")
        return feedback, reply.model_version
