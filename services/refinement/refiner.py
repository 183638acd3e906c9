"""Plain-Python core of the refinement service."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import grpc

from ilf import prompts, tasksets
from ilf.errors import InvalidArgument, NotFound, Unavailable, upstream_error
from ilf.registry import Registry, base_version_id
from ilf.sampling import Sampling
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.refinement.config import RefinementConfig

log = logging.getLogger(__name__)

CHANNEL = "refinement"
LOAD_CALL_S = 1800.0
GENERATE_CALL_S = 3600.0


@dataclass
class TaskSpec:
    task_id: int = 0
    text: str = ""
    tests: tuple[str, ...] = ()
    code_prefix: str = ""
    task_set: str = ""                # with task_id alone: the task set it is in (empty: MBPP)


@dataclass
class RefinedProgram:
    program: str                      # generation prompt + refined body, ready to execute
    completion: common_pb2.Completion  # what the model wrote


def task_prompt(task: TaskSpec, strip: bool = True, task_sets: tasksets.TaskSets | None = None) -> str:
    """The generation prompt of the task: from its task set (MBPP without `task_sets`) when only the id is
    given, else from its fields."""
    if task.text or task.tests or task.code_prefix:
        if not (task.text and task.tests and task.code_prefix):
            raise InvalidArgument("a task given by value needs text, at least one test and a code_prefix")
        return prompts.generation_prompt(task.text, task.tests, task.code_prefix, strip=strip)
    if task.task_id <= 0:
        raise InvalidArgument("the request names no task: give task.task_id or the task's text, tests and code_prefix")
    if task_sets is None and task.task_set not in ("", tasksets.MBPP):
        raise NotFound(f"no task set {task.task_set!r} here")
    found = (task_sets.get(task.task_set) if task_sets else tasksets.mbpp()).task(task.task_id)
    return prompts.task_prompt(found, strip=strip)


class Refiner:
    """pi_Refine: builds the paper's refinement prompt and samples from the pi_Refine model version.

    The weights are served by the generation service (one batching engine for every model version),
    so this service holds only which version is pi_Refine and talks to it through the contract.
    """

    def __init__(self, registry: Registry, generation: generation_pb2_grpc.GenerationStub,
                 settings: RefinementConfig):
        self.registry = registry
        self.generation = generation
        self.settings = settings
        self.task_sets = tasksets.TaskSets(registry.store)
        self.version: str | None = None

    def start_version(self) -> str:
        """ILF_REFINEMENT_MODEL, else the channel's serving pointer, else the base model's id (the generation service
        registers the base once it has loaded it)."""
        return (self.settings.start_model or self.registry.serving_version(CHANNEL)
                or base_version_id(self.settings.base_model))

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

    def follow(self, pointer: dict) -> None:
        """Refines with the version the channel's serving pointer names (loaded first, so a failure changes nothing)."""
        if pointer["version"] != self.version:
            self._load(pointer["version"])
            self.version = pointer["version"]
            log.info("refinement model is now %s (the serving pointer moved)", self.version)

    def describe(self) -> dict:
        """What this replica refines with, for its fleet report."""
        return {"serving_version": self.version or "", "loaded_versions": [self.version] if self.version else []}

    def refine(self, task: TaskSpec, failing_program: str, feedback: str,
               sampling: Sampling) -> tuple[list[RefinedProgram], str, str]:
        """Returns (refined programs, the refinement prompt, the model version)."""
        self._check_request(failing_program, feedback, sampling)
        version = self.version
        if version is None:
            raise Unavailable("the refinement model is still loading")
        gen_prompt = task_prompt(task, self.settings.prompt_strip, self.task_sets)
        prompt = prompts.refinement_prompt(failing_program, feedback, gen_prompt)
        # The refinement ends where the program does, whatever stops the caller adds.
        stop = tuple(dict.fromkeys([*sampling.stop, *prompts.STOP_SEQUENCES]))
        request = generation_pb2.GenerateRequest(prompt=prompt, model_version=version,
                                                 params=dataclasses.replace(sampling, stop=stop).to_proto())
        try:
            reply = self._generate(request)
        except grpc.RpcError as error:
            raise upstream_error("generation", error) from None
        refined = [RefinedProgram(gen_prompt + prompts.truncate_completion(c.text), c) for c in reply.completions]
        return refined, prompt, reply.model_version

    def _check_request(self, failing_program: str, feedback: str, sampling: Sampling) -> None:
        limits = self.settings
        if not failing_program.strip():
            raise InvalidArgument("failing_program is empty")
        if len(failing_program) > limits.max_program_chars:
            raise InvalidArgument(f"failing_program is longer than {limits.max_program_chars} characters "
                                  "(ILF_MAX_PROGRAM_CHARS)")
        if not feedback.strip():
            raise InvalidArgument("feedback is empty")
        if len(feedback) > limits.max_feedback_chars:
            raise InvalidArgument(f"feedback is longer than {limits.max_feedback_chars} characters "
                                  "(ILF_MAX_FEEDBACK_CHARS)")
        if not 1 <= sampling.n <= limits.max_samples:
            raise InvalidArgument(f"n must be between 1 and {limits.max_samples} (ILF_REFINEMENT_MAX_N), "
                                  f"got {sampling.n}")
        if not 1 <= sampling.max_new_tokens <= limits.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens must be between 1 and {limits.max_new_tokens} "
                                  f"(ILF_REFINEMENT_MAX_NEW_TOKENS), got {sampling.max_new_tokens}")
        if not 0 <= sampling.temperature <= 5:
            raise InvalidArgument(f"temperature must be between 0 and 5, got {sampling.temperature}")

    def _generate(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateResponse:
        try:
            return self.generation.Generate(request, timeout=GENERATE_CALL_S)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        # The generation service keeps a few versions loaded and may have dropped pi_Refine: load it again.
        self._load(request.model_version)
        return self.generation.Generate(request, timeout=GENERATE_CALL_S)

