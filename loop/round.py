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
from dataclasses import asdict, dataclass

import grpc
from tqdm import tqdm

from ilf import data, datasets, prompts
from ilf.store import ArtifactStore
from ilf.v1 import common_pb2, feedback_pb2, generation_pb2, refinement_pb2, training_pb2
from loop.clients import Clients
from loop.evaluation import LONG_CALL_S, RoundFailed, concurrently, evaluate, execute, sampling_params
from loop.report import chart, ks_of, markdown_table, summary
from loop.settings import RoundSettings

log = logging.getLogger(__name__)


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
            params=sampling_params(settings.refine_samples, settings.refine_temperature, settings.max_new_tokens * 2,
                           settings.seed + item.task_id)), timeout=LONG_CALL_S)
    for item, reply in concurrently(refine, items, settings.concurrency, "refine"):
        refine_version = reply.model_version
        for i, refinement in enumerate(reply.refinements):
            programs[f"{item.task_id}:{i}"] = (refinement.program, data.task(item.task_id))
            sources[f"{item.task_id}:{i}"] = item.record_id
    verdicts = execute(clients, programs, settings.timeout_s) if programs else {}
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
    verdicts = execute(clients, programs, settings.timeout_s) if programs else {}
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
    verdicts = execute(clients, programs, settings.timeout_s)
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
    report["before"] = summary(before, solved_tasks=True)
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
    report["after"] = summary(after, solved_tasks=True)
    drop = before.pass_at[1] - after.pass_at[1]
    if settings.switch and (settings.promote_margin is None or drop <= settings.promote_margin):
        status = clients.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version=candidate),
                                                timeout=LONG_CALL_S)
        report["outcome"] = f"switched serving from {before.model_version} to {status.serving_version}"
    else:
        report["outcome"] = (f"candidate {candidate} not promoted (pass@1 change {-drop:+.3f}, "
                             f"margin {settings.promote_margin}); {before.model_version} keeps serving")
    return _finish(report, store, started)


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
    rows = {label: {**report[label], "version": report[label]["model_version"]}
            for label in ("before", "after") if label in report}
    ks = ks_of(rows)
    lines = [f"## ILF round {report['round_id']}", "",
             *markdown_table("model", rows, ks, {"version": lambda row: f"`{row['version']}`"})]
    s = report["settings"]
    lines += ["", f"- evaluation: {len(report['eval_task_ids'])} {data.EVALUATION_SPLITS[s['eval_split']]} tasks, "
                  f"{s['eval_samples']} sample(s) at temperature {s['eval_temperature']}",
              f"- training data ({s['train_on']}): " + ", ".join(f"{k} {v}" for k, v in report["data"].items()),
              f"- outcome: {report['outcome']}", f"- wall time: {report['wall_seconds']} s"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict) -> bytes:
    rows = {f"{label}: {report[label]['model_version']}": report[label] for label in ("before", "after")}
    return chart(rows, f"ILF round {report['round_id']}", report["settings"]["eval_split"])
