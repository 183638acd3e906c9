"""pass@k of a model version on tasks, through the generation and execution services."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from ilf import passk, prompts
from ilf.tasksets import Task, TaskSet
from ilf.v1 import common_pb2, execution_pb2, generation_pb2
from loop.clients import Clients
from loop.settings import RoundSettings

LONG_CALL_S = 1800


class RoundFailed(RuntimeError):
    pass


@dataclass
class Evaluation:
    model_version: str
    results: dict[int, tuple[int, int]]   # task id -> (samples, correct)
    pass_at: dict[int, float] = field(default_factory=dict)
    intervals: dict[int, tuple[float, float]] = field(default_factory=dict)


def sampling_params(n: int, temperature: float, max_new_tokens: int, seed: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(n=n, temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                                     max_new_tokens=max_new_tokens, stop=prompts.STOP_SEQUENCES, seed=seed)


def concurrently(call, items: list, workers: int, label: str):
    """Yields (item, call(item)) in item order, with up to `workers` calls in flight so the
    services can batch them; the progress bar counts calls as they finish."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(items), desc=label, unit="task") as bar:
        futures = [pool.submit(call, item) for item in items]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        for item, future in zip(items, futures):
            yield item, future.result()


def execute(clients: Clients, programs: dict[str, tuple[str, Task]], timeout_s: float) -> dict[str, bool]:
    """Runs every program against its task's tests in one streamed batch; returns pass/fail by id."""
    requests = [execution_pb2.ExecuteRequest(program=program, test_setup_code=task.test_setup_code,
                                             tests=list(task.tests), timeout_s=timeout_s, request_id=rid)
                for rid, (program, task) in programs.items()]
    verdicts = {}
    for finished in clients.execution.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests),
                                                   timeout=LONG_CALL_S):
        verdicts.update((result.request_id, result.passed) for result in finished.results)
    missing = set(programs) - set(verdicts)
    if missing:
        raise RoundFailed(f"the execution service returned no verdict for {len(missing)} programs")
    return verdicts


def evaluation_tasks(task_set: TaskSet, settings: RoundSettings) -> list[Task]:
    """The first settings.eval_tasks tasks of the evaluation split (MBPP: MBPP_Test, or dev for choosing settings)."""
    tasks = task_set.split(settings.eval_split)[: settings.eval_tasks or None]
    if not tasks:
        raise RoundFailed(f"task set {task_set.name} has no {settings.eval_split} tasks to evaluate on")
    return tasks


def evaluate(clients: Clients, tasks: list[Task], settings: RoundSettings, model_version: str = "",
             label: str = "evaluate") -> Evaluation:
    """pass@k of a model version on tasks, with per-task seeds shared by every evaluated version."""
    programs, served_by = {}, set()

    def generate(task):
        return clients.generation.Generate(generation_pb2.GenerateRequest(
            prompt=prompts.task_prompt(task), model_version=model_version,
            params=sampling_params(settings.eval_samples, settings.eval_temperature, settings.max_new_tokens,
                           settings.seed + task.task_id)), timeout=LONG_CALL_S)
    for task, reply in concurrently(generate, tasks, settings.concurrency, label):
        served_by.add(reply.model_version)
        for i, completion in enumerate(reply.completions):
            programs[f"{task.task_id}:{i}"] = (prompts.task_prompt(task) + prompts.truncate_completion(completion.text),
                                               task)
    if len(served_by) != 1:
        raise RoundFailed(f"the evaluation was served by several model versions: {sorted(served_by)}")
    verdicts = execute(clients, programs, settings.timeout_s)
    results = {t.task_id: (settings.eval_samples,
                           sum(verdicts[f"{t.task_id}:{i}"] for i in range(settings.eval_samples))) for t in tasks}
    evaluation = Evaluation(model_version=served_by.pop(), results=results)
    for k in settings.ks:
        evaluation.pass_at[k] = passk.mean_pass_at_k(results, k)
        evaluation.intervals[k] = passk.bootstrap_interval(results, k)
    return evaluation
