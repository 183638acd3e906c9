"""pass@k of a model version on tasks, through the generation and execution services."""
from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from ilf import passk, prompts
from ilf.store import ArtifactStore
from ilf.tasksets import Task, TaskSet
from ilf.v1 import common_pb2, execution_pb2, generation_pb2
from loop.clients import Clients
from loop.settings import RoundSettings

LONG_CALL_S = 1800
# Programs per ExecuteBatch call: the service refuses more than ILF_EXECUTION_MAX_BATCH (default 2,000), and 128
# tasks x 30 refinements are 3,840 programs (a run lost its 45 minutes of refinements to that refusal, 2026-12-04).
EXECUTE_BATCH = 500


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


def execute(clients: Clients, programs: dict[str, tuple[str, Task]], timeout_s: float,
            batch: int = EXECUTE_BATCH) -> dict[str, bool]:
    """Runs every program against its task's tests in streamed batches of at most `batch`; returns pass/fail by id."""
    requests = [execution_pb2.ExecuteRequest(program=program, test_setup_code=task.test_setup_code,
                                             tests=list(task.tests), timeout_s=timeout_s, request_id=rid)
                for rid, (program, task) in programs.items()]
    verdicts = {}
    for start in range(0, len(requests), batch):
        chunk = execution_pb2.ExecuteBatchRequest(requests=requests[start:start + batch])
        for finished in clients.execution.ExecuteBatch(chunk, timeout=LONG_CALL_S):
            verdicts.update((result.request_id, result.passed) for result in finished.results)
    missing = set(programs) - set(verdicts)
    if missing:
        raise RoundFailed(f"the execution service returned no verdict for {len(missing)} programs")
    return verdicts


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps the programs it sampled until they are judged. 128 tasks x 30 refinements take 45 minutes
    on 2 CPU cores, and a failure after them (the execution service down, a refused batch) must not lose them: the
    next run with the same inputs reads them back instead of sampling again."""
    store: ArtifactStore
    key: str

    def sampled(self, inputs: dict, sample: Callable[[], tuple[dict[str, str], str]]) -> tuple[dict[str, str], str]:
        """sample() -> ({id: program}, the model version that wrote them), or what an earlier call saved under
        the key for the same inputs (the prompts' contents, the sampling settings and the model version)."""
        inputs = json.loads(json.dumps(inputs))  # tuples and lists compare equal once both went through JSON
        if self.store.exists(self.key):
            saved = self.store.get_json(self.key)
            if saved["inputs"] == inputs:
                tqdm.write(f"{len(saved['programs'])} programs sampled earlier, read back from {self.key}")
                return dict(saved["programs"]), saved["model_version"]
            tqdm.write(f"{self.key} was sampled from other inputs: sampling again")
        programs, version = sample()
        # (id, program) pairs: the store sorts a JSON object's keys, and the order decides which passing one is kept
        self.store.put_json(self.key, {"inputs": inputs, "model_version": version,
                                       "programs": list(programs.items())}, overwrite=True)
        return programs, version


def evaluation_tasks(task_set: TaskSet, settings: RoundSettings) -> list[Task]:
    """The first settings.eval_tasks tasks of the evaluation split (MBPP: MBPP_Test, or dev for choosing settings)."""
    tasks = task_set.split(settings.eval_split)[: settings.eval_tasks or None]
    if not tasks:
        raise RoundFailed(f"task set {task_set.name} has no {settings.eval_split} tasks to evaluate on")
    return tasks


@dataclass(frozen=True)
class Prompted:
    """One request for samples: the model continues `prompt`, and each program is `prefix` plus the sample
    cut where the program ends (for generation both are the task's prompt; a refinement's prefix is the
    generation prompt at the end of its refinement prompt)."""
    key: str
    task: Task
    prompt: str
    prefix: str
    seed: int


def sample_programs(clients: Clients, requests: list[Prompted], n: int, temperature: float, max_new_tokens: int,
                    concurrency: int, model_version: str = "", label: str = "sample"):
    """n programs per request ("key:i" -> (program, task)), and the one model version that wrote them."""
    programs, served_by = {}, set()

    def generate(request: Prompted):
        return clients.generation.Generate(generation_pb2.GenerateRequest(
            prompt=request.prompt, model_version=model_version,
            params=sampling_params(n, temperature, max_new_tokens, request.seed)), timeout=LONG_CALL_S)
    for request, reply in concurrently(generate, requests, concurrency, label):
        served_by.add(reply.model_version)
        for i, completion in enumerate(reply.completions):
            programs[f"{request.key}:{i}"] = (request.prefix + prompts.truncate_completion(completion.text),
                                              request.task)
    if len(served_by) > 1:
        raise RoundFailed(f"the samples were written by several model versions: {sorted(served_by)}")
    return programs, served_by.pop() if served_by else model_version


def per_task_results(outcomes) -> dict[int, tuple[int, int]]:
    """(task id, passed) pairs -> task id -> (samples, passing samples)."""
    results: dict[int, tuple[int, int]] = {}
    for task_id, passed in outcomes:
        n, c = results.get(task_id, (0, 0))
        results[task_id] = (n + 1, c + int(passed))
    return results


def scored(model_version: str, results: dict[int, tuple[int, int]], ks: list[int]) -> Evaluation:
    """pass@k with bootstrap 95% intervals over tasks, for every k that the samples per task allow."""
    evaluation = Evaluation(model_version=model_version, results=results)
    for k in ks:
        evaluation.pass_at[k] = passk.mean_pass_at_k(results, k)
        evaluation.intervals[k] = passk.bootstrap_interval(results, k)
    return evaluation


def evaluate(clients: Clients, tasks: list[Task], settings: RoundSettings, model_version: str = "",
             label: str = "evaluate") -> Evaluation:
    """pass@k of a model version on tasks, with per-task seeds shared by every evaluated version."""
    requests = [Prompted(str(t.task_id), t, prompts.task_prompt(t), prompts.task_prompt(t), settings.seed + t.task_id)
                for t in tasks]
    programs, version = sample_programs(clients, requests, settings.eval_samples, settings.eval_temperature,
                                        settings.max_new_tokens, settings.concurrency, model_version, label)
    verdicts = execute(clients, programs, settings.timeout_s)
    return scored(version, per_task_results((task.task_id, verdicts[rid]) for rid, (_, task) in programs.items()),
                  settings.ks)
