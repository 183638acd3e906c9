"""One ILF round, driven as a gRPC client of the services (paper Algorithm 1).

evaluate the serving model -> refine annotated failing programs with their feedback -> keep the
refinements that pass the tests -> fine-tune -> evaluate the candidate on the same tasks and
seeds -> switch serving to it -> report (JSON, Markdown and a plot, stored as artifacts).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
from tqdm import tqdm

from ilf import data, datasets, passk, prompts
from ilf.clients import Clients
from ilf.store import ArtifactStore
from ilf.v1 import common_pb2, execution_pb2, feedback_pb2, generation_pb2, refinement_pb2, training_pb2

log = logging.getLogger(__name__)

# refinements: pi_Refine's passing refinements (ILF); refinements+human: the same, plus the passing
# human refinement attached to the feedback for tasks pi_Refine could not fix; human: the paper's human
# refinements; gold: MBPP's programs.
TRAIN_SOURCES = ("refinements", "refinements+human", "human", "gold")
LONG_CALL_S = 1800


class RoundFailed(RuntimeError):
    pass


@dataclass
class RoundSettings:
    eval_tasks: int = 20             # first N tasks of the evaluation split; 0 means all (MBPP_Test: 100)
    eval_split: str = "test"         # "test": MBPP_Test (11-110); "dev": for choosing settings (data.EVALUATION_SPLITS)
    eval_samples: int = 1            # samples per task; the paper uses 30
    eval_temperature: float = 0.0    # the paper uses 0.8 with 30 samples
    train_tasks: int = 24            # annotated MBPP_Train tasks to refine; 0 means all 128
    refine_samples: int = 2
    refine_temperature: float = 0.8
    max_new_tokens: int = 128
    train_on: str = "refinements"    # one of TRAIN_SOURCES
    method: str = "lora"
    learning_rate: float = 0.0       # 0: the training service's default for the method
    epochs: int = 0
    batch_size: int = 0
    seed: int = 1234
    timeout_s: float = 3.0           # per program, as in the paper
    switch: bool = True
    train_refiner: bool = True       # fine-tune pi_Refine on MBPP_Refine before refining (paper)
    concurrency: int = 8             # requests in flight to a service, so it can batch them
    promote_margin: float | None = None  # if set: switch only when pass@1 drops by at most this much

    def __post_init__(self):
        if self.train_on not in TRAIN_SOURCES:
            raise ValueError(f"train_on must be one of {TRAIN_SOURCES}")
        if self.eval_split not in data.EVALUATION_SPLITS:
            raise ValueError(f"eval_split must be one of {tuple(data.EVALUATION_SPLITS)}")

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


def _concurrently(call, items: list, workers: int, label: str):
    """Yields (item, call(item)) in item order, with up to `workers` calls in flight so the
    services can batch them; the progress bar counts calls as they finish."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(items), desc=label, unit="task") as bar:
        futures = [pool.submit(call, item) for item in items]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        for item, future in zip(items, futures):
            yield item, future.result()


def _execute(clients: Clients, programs: dict[str, tuple[str, data.MBPPTask]], timeout_s: float) -> dict[str, bool]:
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


def evaluate(clients: Clients, tasks: list[data.MBPPTask], settings: RoundSettings, model_version: str = "",
             label: str = "evaluate") -> Evaluation:
    """pass@k of a model version on tasks, with per-task seeds shared by every evaluated version."""
    programs, served_by = {}, set()

    def generate(task):
        return clients.generation.Generate(generation_pb2.GenerateRequest(
            prompt=prompts.mbpp_prompt(task), model_version=model_version,
            params=_params(settings.eval_samples, settings.eval_temperature, settings.max_new_tokens,
                           settings.seed + task.task_id)), timeout=LONG_CALL_S)
    for task, reply in _concurrently(generate, tasks, settings.concurrency, label):
        served_by.add(reply.model_version)
        for i, completion in enumerate(reply.completions):
            programs[f"{task.task_id}:{i}"] = (prompts.mbpp_prompt(task) + prompts.truncate_completion(completion.text),
                                               task)
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


@dataclass(frozen=True)
class FeedbackItem:
    task_id: int
    program: str      # the failing program
    feedback: str
    record_id: str = ""  # the feedback record it came from, kept in the dataset for lineage
    human_refinement: str = ""  # a repaired program the annotator wrote, if any


def human_feedback(clients: Clients, limit: int = 0) -> list[FeedbackItem]:
    """Human feedback on MBPP_Train programs from the feedback service, one record per task, by task id.

    The paper's annotations are imported first (idempotent), so a fresh system has the paper's 128.
    """
    clients.feedback.ImportPaperAnnotations(feedback_pb2.ImportPaperAnnotationsRequest(), timeout=600)
    records = clients.feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(filter=feedback_pb2.FeedbackFilter(
        split="train", author_kind=feedback_pb2.AUTHOR_KIND_HUMAN)), timeout=600).records
    first_per_task = {}
    for record in records:
        first_per_task.setdefault(record.task_id, record)
    chosen = [first_per_task[t] for t in sorted(first_per_task)][: limit or None]
    return [FeedbackItem(r.task_id, r.program, r.feedback, r.record_id, r.human_refinement) for r in chosen]


def refine_and_filter(clients: Clients, items: list[FeedbackItem], settings: RoundSettings):
    """Asks pi_Refine for refinements of each failing program given its feedback; keeps passing ones.

    Returns (one passing refinement per task as training records, statistics).
    """
    programs, sources, refine_version = {}, {}, ""

    def refine(item):
        return clients.refinement.Refine(refinement_pb2.RefineRequest(
            task=common_pb2.Task(task_id=item.task_id), failing_program=item.program, feedback=item.feedback,
            params=_params(settings.refine_samples, settings.refine_temperature, settings.max_new_tokens * 2,
                           settings.seed + item.task_id)), timeout=LONG_CALL_S)
    for item, reply in _concurrently(refine, items, settings.concurrency, "refine"):
        refine_version = reply.model_version
        for i, refinement in enumerate(reply.refinements):
            programs[f"{item.task_id}:{i}"] = (refinement.program, data.task(item.task_id))
            sources[f"{item.task_id}:{i}"] = item.record_id
    verdicts = _execute(clients, programs, settings.timeout_s) if programs else {}
    records, passing_per_task = {}, {}
    for rid, (program, task) in sorted(programs.items()):
        passing_per_task[task.task_id] = passing_per_task.get(task.task_id, 0) + verdicts[rid]
        if verdicts[rid] and task.task_id not in records:
            records[task.task_id] = {**_record(task, program, "refinement", refine_version),
                                     "feedback_record": sources[rid]}
    stats = {"refinement_model": refine_version, "tasks": len(items), "refinements": len(programs),
             "passing_refinements": int(sum(verdicts.values())),
             "tasks_with_passing_refinement": sum(1 for c in passing_per_task.values() if c)}
    return list(records.values()), stats


def _record(task: data.MBPPTask, program: str, source: str, producer: str = "") -> dict:
    """A fine-tuning pair for pi_theta: the task's generation prompt and the body that follows it."""
    prompt = prompts.mbpp_prompt(task)
    return {"task_id": task.task_id, "prompt": prompt, "completion": prompts.completion_after(program, prompt),
            "source": source, "producer": producer}


def _human_program(note: data.Annotation) -> str:
    """The human refinement after the task's prompt rebuilt from MBPP (two annotation rows store a
    prompt with mangled characters). Where the annotator also edited the prompt (imports, say), only
    the body can follow our prompt; the round's test filter drops what then fails."""
    body = (note.refinement_program[len(note.prompt):] if note.refinement_program.startswith(note.prompt)
            else note.refinement_body)
    return prompts.mbpp_prompt(data.task(note.task_id), strip=False) + body


def refiner_records(annotations: list[data.Annotation]) -> list[dict]:
    """pi_Refine training pairs (paper: the 44 MBPP_Refine triples): refinement prompt -> human refinement."""
    records = []
    for note in annotations:
        pair = _record(data.task(note.task_id), _human_program(note), "human-refinement", note.annotator)
        pair["prompt"] = prompts.refinement_prompt(note.failing_program, note.feedback, pair["prompt"])
        records.append(pair)
    return records


def human_refinement_records(clients: Clients, items: list[FeedbackItem], settings: RoundSettings) -> list[dict]:
    """Training pairs from the human refinements attached to feedback that pass their tests.

    A refinement is usable only where it continues the task's prompt (some annotators edited the prompt too).
    """
    programs = {item.record_id: (item.human_refinement, data.task(item.task_id)) for item in items
                if item.human_refinement.startswith(prompts.mbpp_prompt(data.task(item.task_id)))}
    verdicts = _execute(clients, programs, settings.timeout_s) if programs else {}
    return [{**_record(task, program, "human-refinement"), "feedback_record": rid}
            for rid, (program, task) in programs.items() if verdicts[rid]]


def training_records(settings: RoundSettings, clients: Clients, annotations: list[data.Annotation]):
    if settings.train_on.startswith("refinements"):
        items = human_feedback(clients, settings.train_tasks)
        records, stats = refine_and_filter(clients, items, settings)
        if settings.train_on == "refinements+human":
            fixed = {r["task_id"] for r in records}
            human = human_refinement_records(clients, [i for i in items if i.task_id not in fixed], settings)
            records += human
            stats["human_refinements_for_unfixed_tasks"] = len(human)
        return records, stats
    if settings.train_on == "human":
        programs = {str(a.task_id): (_human_program(a), data.task(a.task_id)) for a in annotations}
    else:
        programs = {str(a.task_id): (prompts.gold_program(data.task(a.task_id)), data.task(a.task_id))
                    for a in annotations}
    # Only programs that pass their tests are trained on, whoever wrote them.
    verdicts = _execute(clients, programs, settings.timeout_s)
    records = [_record(task, program, settings.train_on) for rid, (program, task) in programs.items() if verdicts[rid]]
    return records, {"tasks": len(annotations), "records": len(records),
                     "dropped_failing": len(programs) - len(records)}


def train(clients: Clients, dataset: str, base_version: str, settings: RoundSettings,
          purpose: str = "generation") -> training_pb2.Run:
    """Submits a fine-tuning run and follows it to its end, with a progress bar."""
    run = clients.training.SubmitRun(training_pb2.SubmitRunRequest(
        dataset=dataset, base_model_version=base_version, purpose=purpose,
        hyperparameters=training_pb2.Hyperparameters(
            method=settings.method, learning_rate=settings.learning_rate, epochs=settings.epochs,
            batch_size=settings.batch_size, seed=settings.seed)), timeout=60)
    bar = tqdm(desc=f"train {purpose} ({run.run_id})", unit="step")
    try:
        run = _follow_run(clients, run, bar)
    finally:
        bar.close()
    if run.state != training_pb2.RUN_STATE_SUCCEEDED:
        raise RoundFailed(f"training run {run.run_id} ended {training_pb2.RunState.Name(run.state)}: {run.error}")
    return run


def _follow_run(clients: Clients, run: training_pb2.Run, bar: tqdm, reconnect_s: float = 600.0) -> training_pb2.Run:
    """Follows a run to its end; if the training service restarts, reconnects (its run state is in the store)."""
    ended = (training_pb2.RUN_STATE_SUCCEEDED, training_pb2.RUN_STATE_FAILED, training_pb2.RUN_STATE_CANCELLED)
    lost_since = None
    while run.state not in ended:
        try:
            for run in clients.training.WatchRun(training_pb2.GetRunRequest(run_id=run.run_id), timeout=6 * 3600):
                lost_since = None
                bar.total = run.progress.total_steps or None
                bar.n = run.progress.step
                bar.set_postfix(state=training_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower(),
                                loss=f"{run.progress.loss:.3f}")
                bar.refresh()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > reconnect_s:
                raise RoundFailed(f"the training service stayed unreachable for {reconnect_s:.0f} s "
                                  f"while run {run.run_id} was {training_pb2.RunState.Name(run.state)}") from error
            log.warning("training service unreachable (%s); reconnecting to run %s", error.details(), run.run_id)
            time.sleep(2)
    return run


def train_refiner(clients: Clients, store: ArtifactStore, settings: RoundSettings, tag: str) -> dict:
    """Fine-tunes pi_Refine on the MBPP_Refine triples and makes the refinement service serve it."""
    base = clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest(), timeout=60).serving_version
    records = refiner_records(data.annotations("refine"))
    dataset = datasets.put_dataset(store, records, name=f"{tag}-refiner")
    run = train(clients, dataset, base, settings, purpose="refinement")
    clients.refinement.SwitchModel(refinement_pb2.RefinementSwitchRequest(model_version=run.output_model_version),
                                   timeout=LONG_CALL_S)
    return {"base_version": base, "model_version": run.output_model_version, "dataset": dataset,
            "examples": len(records), "run_id": run.run_id}


def run_round(settings: RoundSettings, clients: Clients, store: ArtifactStore) -> dict:
    started = time.monotonic()
    round_id = f"round-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    eval_tasks = data.evaluation_tasks(settings.eval_split)[: settings.eval_tasks or None]
    annotations = data.annotations("train")[: settings.train_tasks or None]
    report = {"round_id": round_id, "settings": asdict(settings), "eval_task_ids": [t.task_id for t in eval_tasks]}

    before = evaluate(clients, eval_tasks, settings, label="evaluate serving model")
    report["before"] = _evaluation_summary(before)
    if settings.train_on.startswith("refinements") and settings.train_refiner:
        report["refiner"] = train_refiner(clients, store, settings, round_id)
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
    lines += ["", f"- evaluation: {len(report['eval_task_ids'])} {data.EVALUATION_SPLITS[s['eval_split']]} tasks, {s['eval_samples']} sample(s) "
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
    ax.set_ylabel(data.EVALUATION_SPLITS[report["settings"]["eval_split"]])
    ax.set_title(f"ILF round {report['round_id']}")
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
