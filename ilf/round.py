"""One ILF round, driven as a gRPC client of the four services (paper Algorithm 1).

evaluate the serving model -> refine annotated failing programs with their feedback -> keep the
refinements that pass the tests -> fine-tune -> evaluate the candidate on the same tasks and
seeds -> switch serving to it -> report (JSON, Markdown and a plot, stored as artifacts).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field

import grpc
from tqdm import tqdm

from ilf import data, datasets, passk, prompts
from ilf.clients import Clients
from ilf.store import ArtifactStore
from ilf.v1 import (common_pb2, execution_pb2, generation_pb2, refinement_pb2, training_pb2)

log = logging.getLogger(__name__)

TRAIN_SOURCES = ("refinements", "human", "gold")
LONG_CALL_S = 1800


class RoundFailed(RuntimeError):
    pass


@dataclass
class RoundSettings:
    eval_tasks: int = 20             # first N tasks of MBPP_Test (11-110); 0 means all 100
    eval_samples: int = 1            # samples per task; the paper uses 30
    eval_temperature: float = 0.0    # the paper uses 0.8 with 30 samples
    train_tasks: int = 24            # annotated MBPP_Train tasks to refine; 0 means all 128
    refine_samples: int = 2
    refine_temperature: float = 0.8
    max_new_tokens: int = 128
    train_on: str = "refinements"    # refinements (ILF), human (human refinements) or gold (MBPP programs)
    method: str = "lora"
    learning_rate: float = 0.0       # 0: the training service's default for the method
    epochs: int = 0
    batch_size: int = 0
    seed: int = 1234
    timeout_s: float = 3.0           # per program, as in the paper
    switch: bool = True
    promote_margin: float | None = None  # if set: switch only when pass@1 drops by at most this much

    def __post_init__(self):
        if self.train_on not in TRAIN_SOURCES:
            raise ValueError(f"train_on must be one of {TRAIN_SOURCES}")

    @property
    def ks(self) -> list[int]:
        return [k for k in (1, 5, 10) if k <= self.eval_samples] or [1]


@dataclass
class Evaluation:
    model_version: str
    results: dict[int, tuple[int, int]]   # task id -> (samples, correct)
    pass_at: dict[int, float] = field(default_factory=dict)
    intervals: dict[int, tuple[float, float]] = field(default_factory=dict)


def _params(n: int, temperature: float, max_new_tokens: int, seed: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(n=n, temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                                     max_new_tokens=max_new_tokens, stop=prompts.STOP_SEQUENCES, seed=seed)


def _execute(clients: Clients, programs: dict[str, tuple[str, data.MBPPTask]], timeout_s: float) -> dict[str, bool]:
    """Runs every program against its task's tests in one streamed batch; returns pass/fail by id."""
    requests = [execution_pb2.ExecuteRequest(program=program, test_setup_code=task.test_setup_code,
                                             tests=list(task.tests), timeout_s=timeout_s, request_id=rid)
                for rid, (program, task) in programs.items()]
    verdicts = {}
    for result in clients.execution.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests),
                                                 timeout=LONG_CALL_S):
        verdicts[result.request_id] = result.passed
    missing = set(programs) - set(verdicts)
    if missing:
        raise RoundFailed(f"the execution service returned no verdict for {len(missing)} programs")
    return verdicts


def evaluate(clients: Clients, tasks: list[data.MBPPTask], settings: RoundSettings, model_version: str = "",
             label: str = "evaluate") -> Evaluation:
    """pass@k of a model version on tasks, with per-task seeds shared by every evaluated version."""
    programs, served_by = {}, set()
    for task in tqdm(tasks, desc=label, unit="task"):
        prompt = prompts.mbpp_prompt(task)
        reply = clients.generation.Generate(generation_pb2.GenerateRequest(
            prompt=prompt, model_version=model_version,
            params=_params(settings.eval_samples, settings.eval_temperature, settings.max_new_tokens,
                           settings.seed + task.task_id)), timeout=LONG_CALL_S)
        served_by.add(reply.model_version)
        for i, completion in enumerate(reply.completions):
            programs[f"{task.task_id}:{i}"] = (prompt + prompts.truncate_completion(completion.text), task)
    if len(served_by) != 1:
        raise RoundFailed(f"the evaluation was served by several model versions: {sorted(served_by)}")
    verdicts = _execute(clients, programs, settings.timeout_s)
    results = {t.task_id: (settings.eval_samples,
                           sum(verdicts[f"{t.task_id}:{i}"] for i in range(settings.eval_samples))) for t in tasks}
    evaluation = Evaluation(model_version=served_by.pop(), results=results)
    for k in settings.ks:
        evaluation.pass_at[k] = passk.mean_pass_at_k(results, k)
        evaluation.intervals[k] = passk.bootstrap_interval(results, k)
    return evaluation


def refine_annotated(clients: Clients, annotations: list[data.Annotation], settings: RoundSettings):
    """Asks pi_Refine for refinements of each annotated failing program; keeps the passing ones.

    Returns (one passing refinement per task as training records, statistics).
    """
    programs, refine_version = {}, ""
    for note in tqdm(annotations, desc="refine", unit="task"):
        reply = clients.refinement.Refine(refinement_pb2.RefineRequest(
            task=common_pb2.Task(task_id=note.task_id), failing_program=note.failing_program,
            feedback=note.feedback, params=_params(settings.refine_samples, settings.refine_temperature,
                                                   settings.max_new_tokens * 2, settings.seed + note.task_id)),
            timeout=LONG_CALL_S)
        refine_version = reply.model_version
        for i, refinement in enumerate(reply.refinements):
            programs[f"{note.task_id}:{i}"] = (refinement.program, data.task(note.task_id))
    verdicts = _execute(clients, programs, settings.timeout_s) if programs else {}
    records, passing_per_task = [], {}
    for rid, passed in verdicts.items():
        task_id = int(rid.split(":")[0])
        passing_per_task[task_id] = passing_per_task.get(task_id, 0) + passed
    for rid, (program, task) in sorted(programs.items()):
        if verdicts[rid] and not any(r["task_id"] == task.task_id for r in records):
            records.append(_record(task, program, "refinement", refine_version))
    stats = {"refinement_model": refine_version, "tasks": len(annotations),
             "refinements": len(programs), "passing_refinements": int(sum(verdicts.values())),
             "tasks_with_passing_refinement": sum(1 for c in passing_per_task.values() if c)}
    return records, stats


def _record(task: data.MBPPTask, program: str, source: str, producer: str = "") -> dict:
    """A fine-tuning pair: the task's generation prompt and the body that follows it in program."""
    prompt = prompts.mbpp_prompt(task)
    full_prompt = prompts.mbpp_prompt(task, strip=False)
    body_source = program if program.startswith(prompt) else full_prompt + program
    return {"task_id": task.task_id, "prompt": prompt, "completion": prompts.completion_after(body_source, prompt),
            "source": source, "producer": producer}


def training_records(settings: RoundSettings, clients: Clients, annotations: list[data.Annotation]):
    if settings.train_on == "refinements":
        return refine_annotated(clients, annotations, settings)
    if settings.train_on == "human":
        records = [_record(data.task(a.task_id), a.refinement_program, "human-refinement", a.annotator)
                   for a in annotations]
    else:
        records = [_record(t, prompts.completion_after(t.code.replace("\r\n", "\n"),
                                                       prompts.code_prefix(t.code, prompts.entry_point(t.tests, t.code))),
                           "gold") for t in (data.task(a.task_id) for a in annotations)]
    return records, {"tasks": len(annotations), "records": len(records)}


def train(clients: Clients, dataset: str, base_version: str, settings: RoundSettings) -> training_pb2.Run:
    """Submits a fine-tuning run and follows it to its end, with a progress bar."""
    run = clients.training.SubmitRun(training_pb2.SubmitRunRequest(
        dataset=dataset, base_model_version=base_version, purpose="generation",
        hyperparameters=training_pb2.Hyperparameters(
            method=settings.method, learning_rate=settings.learning_rate, epochs=settings.epochs,
            batch_size=settings.batch_size, seed=settings.seed)), timeout=60)
    bar = tqdm(desc=f"train {run.run_id}", unit="step")
    try:
        for run in clients.training.WatchRun(training_pb2.GetRunRequest(run_id=run.run_id), timeout=6 * 3600):
            bar.total = run.progress.total_steps or None
            bar.n = run.progress.step
            bar.set_postfix(state=training_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower(),
                            loss=f"{run.progress.loss:.3f}")
            bar.refresh()
    finally:
        bar.close()
    if run.state != training_pb2.RUN_STATE_SUCCEEDED:
        raise RoundFailed(f"training run {run.run_id} ended {training_pb2.RunState.Name(run.state)}: {run.error}")
    return run


def run_round(settings: RoundSettings, clients: Clients, store: ArtifactStore) -> dict:
    started = time.monotonic()
    round_id = f"round-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    eval_tasks = data.split_tasks("test")[: settings.eval_tasks or None]
    annotations = data.annotations("train")[: settings.train_tasks or None]
    report = {"round_id": round_id, "settings": asdict(settings), "eval_task_ids": [t.task_id for t in eval_tasks]}

    before = evaluate(clients, eval_tasks, settings, label="evaluate serving model")
    report["before"] = _evaluation_summary(before)
    records, report["data"] = training_records(settings, clients, annotations)
    if not records:
        report["outcome"] = "no passing refinement: nothing to train, the serving model is unchanged"
        return _finish(report, store, started)
    dataset = datasets.put_dataset(store, records, name=f"{round_id}-{settings.train_on}")
    report["dataset"] = {"key": dataset, "records": len(records)}
    run = train(clients, dataset, before.model_version, settings)
    candidate = run.output_model_version
    report["run"] = {"run_id": run.run_id, "model_version": candidate, "final_loss": run.progress.loss}

    clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=candidate), timeout=LONG_CALL_S)
    after = evaluate(clients, eval_tasks, settings, model_version=candidate, label="evaluate candidate")
    report["after"] = _evaluation_summary(after)
    drop = before.pass_at[1] - after.pass_at[1]
    if settings.switch and (settings.promote_margin is None or drop <= settings.promote_margin):
        status = clients.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version=candidate),
                                                timeout=LONG_CALL_S)
        report["outcome"] = f"switched serving from {before.model_version} to {status.serving_version}"
    else:
        report["outcome"] = (f"candidate {candidate} not promoted (pass@1 change {-drop:+.3f}, "
                             f"margin {settings.promote_margin}); {before.model_version} keeps serving")
    return _finish(report, store, started)


def _evaluation_summary(evaluation: Evaluation) -> dict:
    return {"model_version": evaluation.model_version,
            "pass_at": {str(k): v for k, v in evaluation.pass_at.items()},
            "interval95": {str(k): list(v) for k, v in evaluation.intervals.items()},
            "solved_tasks": sorted(t for t, (_, c) in evaluation.results.items() if c)}


def _finish(report: dict, store: ArtifactStore, started: float) -> dict:
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["markdown"] = markdown_report(report)
    prefix = f"reports/{report['round_id']}"
    store.put(f"{prefix}/report.json", json.dumps(report, indent=2).encode())
    store.put(f"{prefix}/report.md", report["markdown"].encode())
    if "after" in report:
        store.put(f"{prefix}/pass_at_k.png", plot_report(report))
    report["artifacts"] = prefix
    return report


def markdown_report(report: dict) -> str:
    ks = list(report["before"]["pass_at"])
    lines = [f"## ILF round {report['round_id']}", "",
             "| model | version | " + " | ".join(f"pass@{k} (95% CI)" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for label in ("before", "after"):
        if label in report:
            row = report[label]
            cells = [f"{row['pass_at'][k]:.3f} ({row['interval95'][k][0]:.2f}-{row['interval95'][k][1]:.2f})"
                     for k in ks]
            lines.append(f"| {label} | `{row['model_version']}` | " + " | ".join(cells) + " |")
    s = report["settings"]
    lines += ["", f"- evaluation: {len(report['eval_task_ids'])} MBPP_Test tasks, {s['eval_samples']} sample(s) "
                  f"at temperature {s['eval_temperature']}",
              f"- training data ({s['train_on']}): " + ", ".join(f"{k} {v}" for k, v in report["data"].items()),
              f"- outcome: {report['outcome']}", f"- wall time: {report['wall_seconds']} s"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = list(report["before"]["pass_at"])
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.35
    for offset, label in ((-width / 2, "before"), (width / 2, "after")):
        row = report[label]
        values = [row["pass_at"][k] for k in ks]
        errors = [[v - row["interval95"][k][0] for k, v in zip(ks, values)],
                  [row["interval95"][k][1] - v for k, v in zip(ks, values)]]
        ax.bar([i + offset for i in range(len(ks))], values, width, yerr=errors, capsize=4,
               label=f"{label}: {row['model_version']}")
    ax.set_xticks(range(len(ks)), [f"pass@{k}" for k in ks])
    ax.set_ylabel("MBPP_Test")
    ax.set_title(f"ILF round {report['round_id']}")
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
