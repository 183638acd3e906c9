"""Collection: sample a model on a task set's train split, execute the samples, queue the failing ones."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ilf import prompts
from ilf.errors import FailedPrecondition, InvalidArgument, upstream_error
from ilf.tasksets import Task, TaskSet
from ilf.v1 import common_pb2, execution_pb2, generation_pb2, generation_pb2_grpc
from services.feedback.checks import FeedbackChecks
from services.feedback.queue import Item, Queue, item_id_of

GENERATION_CALL_S = 3600.0
CONCURRENT_TASKS = 8         # requests in flight, so the generation service can batch them
MAX_SAMPLES = 64


@dataclass
class Collection:
    model_version: str = ""
    tasks: int = 0
    samples: int = 0
    failing: int = 0
    queued: int = 0
    duplicates: int = 0
    item_ids: list[str] = field(default_factory=list)


def per_test_results(task: Task, result: execution_pb2.ExecuteResponse) -> tuple[dict, ...]:
    """Each test's assert with what the execution service said about it."""
    return tuple({"index": t.index, "test": task.tests[t.index] if t.index < len(task.tests) else "",
                  "verdict": execution_pb2.Verdict.Name(t.verdict).removeprefix("VERDICT_"),
                  "error_type": t.error_type, "error_message": t.error_message, "actual": t.actual,
                  "expected": t.expected, "duration_s": t.duration_s} for t in result.tests)


def _task_params(params: common_pb2.SamplingParams, task: Task) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(params)
    if params.HasField("seed"):
        sampling.seed = params.seed + task.task_id  # per-task seeds, as the evaluation's
    sampling.stop.extend(s for s in prompts.STOP_SEQUENCES if s not in sampling.stop)
    return sampling


def train_tasks(task_set: TaskSet, task_ids: tuple[int, ...]) -> list[Task]:
    """The named tasks, each of the train split (the queue feeds training: a test task's failures must not)."""
    twice = sorted(i for i in set(task_ids) if task_ids.count(i) > 1)
    if twice:
        raise InvalidArgument(f"task_ids names a task twice: {twice}")
    tasks = [task_set.task(task_id) for task_id in task_ids]   # NOT_FOUND for an unknown id
    elsewhere = [f"{t.task_id} ({t.split})" for t in tasks if t.split != "train"]
    if elsewhere:
        raise InvalidArgument(f"collect samples train tasks only; task set {task_set.name} has these in other "
                              f"splits: {', '.join(elsewhere)}")
    return tasks


def collect(task_set: TaskSet, generation: generation_pb2_grpc.GenerationStub, checks: FeedbackChecks,
            queue: Queue, params: common_pb2.SamplingParams, *, max_tasks: int = 0, task_ids: tuple[int, ...] = (),
            model_version: str = "", timeout_s: float = 0.0) -> Collection:
    """Samples params.n programs per train task (the first max_tasks of task_ids, or of the train split when no
    ids are given), runs them, and queues each distinct failing program with its per-test results and the model
    version that wrote it."""
    if not 1 <= params.n <= MAX_SAMPLES:
        raise InvalidArgument(f"params.n must be between 1 and {MAX_SAMPLES}, got {params.n}")
    if not params.max_new_tokens:
        raise InvalidArgument("params.max_new_tokens is 0")
    tasks = (train_tasks(task_set, task_ids) if task_ids else task_set.split("train"))[:max_tasks or None]
    if not tasks:
        raise FailedPrecondition(f"task set {task_set.name} has no train tasks to collect on")

    def sample(task: Task) -> generation_pb2.GenerateResponse:
        try:
            return generation.Generate(generation_pb2.GenerateRequest(
                prompt=prompts.task_prompt(task), params=_task_params(params, task), model_version=model_version),
                timeout=GENERATION_CALL_S)
        except grpc.RpcError as error:
            raise upstream_error("generation", error) from None
    with ThreadPoolExecutor(CONCURRENT_TASKS) as pool:
        replies = list(pool.map(sample, tasks))
    programs, writers = {}, {}
    for task, reply in zip(tasks, replies):
        for i, completion in enumerate(reply.completions):
            rid = f"{task.task_id}:{i}"
            programs[rid] = (task, prompts.task_prompt(task) + prompts.truncate_completion(completion.text))
            writers[rid] = reply.model_version
    results = checks.run_batch(programs, timeout_s)
    collection = Collection(model_version=", ".join(sorted(set(writers.values()))), tasks=len(tasks),
                            samples=len(programs))
    for rid, (task, program) in programs.items():
        result = results.get(rid)
        if result is None:
            raise FailedPrecondition(f"the execution service returned no result for sample {rid}")
        if result.passed:
            continue
        collection.failing += 1
        load_error = f"{result.error_type}: {result.error_message}".strip(": ") if result.error_type else ""
        item, new = queue.add(Item(
            item_id=item_id_of(task_set.name, task.task_id, program), task_set=task_set.name, task_id=task.task_id,
            program=program, model_version=writers[rid], tests=per_test_results(task, result), load_error=load_error,
            created_at=time.time()))
        collection.queued += new
        collection.duplicates += not new
        if item.item_id not in collection.item_ids:
            collection.item_ids.append(item.item_id)
    return collection
