"""Plain-Python core of the refinement service."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from ilf import config, data, prompts
from ilf.errors import InvalidArgument, NotFound, Unavailable, upstream_error
from ilf.registry import Registry
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL = "refinement"
MAX_SAMPLES = 64
MAX_NEW_TOKENS = 1024
MAX_FEEDBACK_CHARS = 8000
MAX_PROGRAM_CHARS = 64000
LOAD_CALL_S = 1800.0
GENERATE_CALL_S = 3600.0


@dataclass
class TaskSpec:
    task_id: int = 0
    text: str = ""
    tests: tuple[str, ...] = ()
    code_prefix: str = ""


@dataclass
class RefinedProgram:
    program: str                      # generation prompt + refined body, ready to execute
    completion: common_pb2.Completion  # what the model wrote


def task_prompt(task: TaskSpec) -> str:
    """The generation prompt of the task: from MBPP when only the id is given, else from its fields."""
    strip = config.enabled("ILF_PROMPT_STRIP")
    if task.text or task.tests or task.code_prefix:
        if not (task.text and task.tests and task.code_prefix):
            raise InvalidArgument("a task given by value needs text, at least one test and a code_prefix")
        return prompts.generation_prompt(task.text, task.tests, task.code_prefix, strip=strip)
    if task.task_id <= 0:
        raise InvalidArgument("the request names no task: give task.task_id or the task's text, tests and code_prefix")
    try:
        return prompts.mbpp_prompt(data.task(task.task_id), strip=strip)
    except KeyError:
        raise NotFound(f"MBPP has no task {task.task_id}") from None


class Refiner:
    """pi_Refine: builds the paper's refinement prompt and samples from the pi_Refine model version.

    The weights are served by the generation service (one batching engine for every model version),
    so this service holds only which version is pi_Refine and talks to it through the contract.
    """

    def __init__(self, registry: Registry, generation: generation_pb2_grpc.GenerationStub):
        self.registry = registry
        self.generation = generation
        self.version: str | None = None

    def start_version(self) -> str:
        return (config.get("ILF_REFINEMENT_MODEL") or self.registry.serving_version(CHANNEL)
                or self.registry.ensure_base(config.get("ILF_BASE_MODEL")).version)

    def _load(self, version: str) -> None:
        try:
            self.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=version), timeout=LOAD_CALL_S)
        except grpc.RpcError as error:
            raise upstream_error("generation", error) from None

    def switch(self, version: str) -> str:
        """Has the generation service load the version, then refines with it; a failed load changes nothing."""
        self.registry.get(version)
        self._load(version)
        self.version = version
        if self.registry.serving_version(CHANNEL) != version:
            self.registry.promote(CHANNEL, version)
        log.info("refinement model is now %s", version)
        return version

    def refine(self, task: TaskSpec, failing_program: str, feedback: str, *, n: int = 1, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, repetition_penalty: float = 1.0,
               seed: int | None = None) -> tuple[list[RefinedProgram], str, str]:
        """Returns (refined programs, the refinement prompt, the model version)."""
        _check_request(failing_program, feedback, n, max_new_tokens, temperature)
        version = self.version
        if version is None:
            raise Unavailable("the refinement model is still loading")
        gen_prompt = task_prompt(task)
        prompt = prompts.refinement_prompt(failing_program, feedback, gen_prompt)
        request = generation_pb2.GenerateRequest(prompt=prompt, model_version=version, params=common_pb2.SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop=prompts.STOP_SEQUENCES, repetition_penalty=repetition_penalty, seed=seed))
        try:
            reply = self._generate(request)
        except grpc.RpcError as error:
            raise upstream_error("generation", error) from None
        refined = [RefinedProgram(gen_prompt + prompts.truncate_completion(c.text), c) for c in reply.completions]
        return refined, prompt, reply.model_version

    def _generate(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateResponse:
        try:
            return self.generation.Generate(request, timeout=GENERATE_CALL_S)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        # The generation service keeps a few versions loaded and may have dropped pi_Refine: load it again.
        self._load(request.model_version)
        return self.generation.Generate(request, timeout=GENERATE_CALL_S)


def _check_request(failing_program: str, feedback: str, n: int, max_new_tokens: int, temperature: float) -> None:
    if not failing_program.strip():
        raise InvalidArgument("failing_program is empty")
    if len(failing_program) > MAX_PROGRAM_CHARS:
        raise InvalidArgument(f"failing_program is longer than {MAX_PROGRAM_CHARS} characters")
    if not feedback.strip():
        raise InvalidArgument("feedback is empty")
    if len(feedback) > MAX_FEEDBACK_CHARS:
        raise InvalidArgument(f"feedback is longer than {MAX_FEEDBACK_CHARS} characters")
    if not 1 <= n <= MAX_SAMPLES:
        raise InvalidArgument(f"n must be between 1 and {MAX_SAMPLES}, got {n}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidArgument(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if not 0 <= temperature <= 5:
        raise InvalidArgument(f"temperature must be between 0 and 5, got {temperature}")

