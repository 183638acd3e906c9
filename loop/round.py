"""One ILF round, driven as a gRPC client of the services (paper Algorithm 1).

evaluate the serving model -> refine its failing programs (or its ancestors') with the newest feedback
on them -> keep the refinements that pass the tests -> fine-tune -> evaluate the candidate on the same
tasks and seeds -> switch serving to it unless its pass@1 dropped by more than the margin -> report
(JSON, Markdown and a plot, stored as artifacts).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass

import grpc
from tqdm import tqdm

from ilf import data, datasets, prompts, tasksets
from ilf.registry import Registry
from ilf.store import ArtifactStore
from ilf.v1 import common_pb2, feedback_pb2, generation_pb2, refinement_pb2, training_pb2
from loop.clients import Clients
from loop.evaluation import (LONG_CALL_S, Checkpoint, Evaluation, RoundFailed, concurrently, evaluate,
                             evaluation_tasks, execute, sampling_params)
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
    program_model_version: str = ""  # the model version that wrote the program ("" for the paper's CodeGen)
    author_kind: str = "human"


AUTHOR_KIND_NAMES = {feedback_pb2.AUTHOR_KIND_HUMAN: "human", feedback_pb2.AUTHOR_KIND_MODEL: "model"}


def training_feedback(clients: Clients, store: ArtifactStore, settings: RoundSettings,
                      serving_version: str) -> tuple[list[FeedbackItem], dict]:
    """The feedback a round refines, from the feedback service, on the first settings.train_tasks tasks (by id)
    of the task set's train split that have any; and what it is: records per model version and author kind.

    newest: per task, the newest record on a program written by the serving model or one of its ancestors;
    all: every such record; paper: the paper's annotations (imported first, idempotently), one per task.
    """
    if settings.feedback == "paper":
        if settings.task_set != tasksets.MBPP:
            raise RoundFailed(f"--feedback paper: the paper's annotations are on MBPP, not {settings.task_set}")
        clients.feedback.ImportPaperAnnotations(feedback_pb2.ImportPaperAnnotationsRequest(), timeout=600)
    author = feedback_pb2.AUTHOR_KIND_HUMAN if settings.feedback_authors == "human" else 0
    records = clients.feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(filter=feedback_pb2.FeedbackFilter(
        task_set=settings.task_set, split="train", author_kind=author)), timeout=600).records  # oldest first
    per_task: dict[int, list] = {}
    if settings.feedback == "paper":
        for record in records:
            if record.source == "paper" and record.task_id not in per_task:
                per_task[record.task_id] = [record]
    else:
        lineage = {version.version for version in Registry(store).chain(serving_version)}
        for record in records:
            if record.program_model_version in lineage:
                if settings.feedback == "newest":
                    per_task[record.task_id] = [record]
                else:
                    per_task.setdefault(record.task_id, []).append(record)
    chosen = [r for task_id in sorted(per_task)[: settings.train_tasks or None] for r in per_task[task_id]]
    items = [FeedbackItem(r.task_id, r.program, r.feedback, r.record_id, r.human_refinement, r.program_model_version,
                          AUTHOR_KIND_NAMES[r.author_kind]) for r in chosen]
    stats = {"policy": settings.feedback, "authors": settings.feedback_authors, "records": len(items),
             "tasks": len({i.task_id for i in items}),
             "by_model_version": dict(Counter(i.program_model_version or "unknown (not a model of this registry)"
                                              for i in items)),
             "by_author_kind": dict(Counter(i.author_kind for i in items))}
    return items, stats


def collect_failures(clients: Clients, settings: RoundSettings, model_version: str = "",
                     task_ids: tuple[int, ...] = ()) -> feedback_pb2.CollectResponse:
    """Has the feedback service sample the serving model (or model_version) on the task set's first
    settings.train_tasks train tasks (of task_ids, when given) and queue the failing programs for annotation."""
    return clients.feedback.Collect(feedback_pb2.CollectRequest(
        task_set=settings.task_set, max_tasks=settings.train_tasks, task_ids=task_ids, model_version=model_version,
        timeout_s=settings.timeout_s, params=sampling_params(settings.collect_samples, settings.collect_temperature,
                                                             settings.max_new_tokens, settings.seed)),
        timeout=LONG_CALL_S)


@dataclass(frozen=True)
class Refinement:
    item: FeedbackItem
    program: str
    passed: bool


def refine_and_execute(clients: Clients, task_set: tasksets.TaskSet, items: list[FeedbackItem],
                       settings: RoundSettings, checkpoint: Checkpoint | None = None) -> tuple[list[Refinement], str]:
    """settings.refine_samples refinements of each failing program given its feedback, from the refinement
    service's pi_Refine, each with its verdict; and pi_Refine's version. With a checkpoint the refinements are
    stored before they are judged, and read back by a later call with the same items, settings and pi_Refine."""
    budget = (settings.refine_samples, settings.refine_temperature, settings.max_new_tokens * 2)

    def refine(item):
        return clients.refinement.Refine(refinement_pb2.RefineRequest(
            task=common_pb2.Task(task_id=item.task_id, task_set=task_set.name), failing_program=item.program,
            feedback=item.feedback, params=sampling_params(*budget, settings.seed + item.task_id)),
            timeout=LONG_CALL_S)

    def sample() -> tuple[dict[str, str], str]:
        programs, version = {}, ""
        for index, (_, reply) in enumerate(concurrently(refine, items, settings.concurrency, "refine")):
            version = reply.model_version
            programs.update((f"{index}:{j}", r.program) for j, r in enumerate(reply.refinements))
        return programs, version
    if checkpoint:
        inputs = {"refiner": serving_refiner(clients), "task_set": task_set.name,
                  "budget": [*budget, settings.seed],
                  "items": [[i.task_id, i.program, i.feedback] for i in items]}
        programs, refine_version = checkpoint.sampled(inputs, sample)
    else:
        programs, refine_version = sample()
    owner = {rid: items[int(rid.split(":")[0])] for rid in programs}
    verdicts = execute(clients, {rid: (program, task_set.task(owner[rid].task_id)) for rid, program in programs.items()},
                       settings.timeout_s) if programs else {}
    return [Refinement(owner[rid], program, verdicts[rid]) for rid, program in programs.items()], refine_version


def refine_and_filter(clients: Clients, task_set: tasksets.TaskSet, items: list[FeedbackItem],
                      settings: RoundSettings, checkpoint: Checkpoint | None = None):
    """Asks pi_Refine for refinements of each failing program given its feedback; keeps passing ones.

    Returns (one passing refinement per feedback record as training records, statistics).
    """
    refinements, refine_version = refine_and_execute(clients, task_set, items, settings, checkpoint)
    records, passing_per_task = {}, {}
    for r in refinements:
        passing_per_task[r.item.task_id] = passing_per_task.get(r.item.task_id, 0) + r.passed
        if r.passed and r.item.record_id not in records:
            records[r.item.record_id] = {**training_pair(task_set.task(r.item.task_id), r.program, "refinement",
                                                   refine_version), "feedback_record": r.item.record_id}
    stats = {"refinement_model": refine_version, "tasks": len({i.task_id for i in items}),
             "refinements": len(refinements), "passing_refinements": sum(r.passed for r in refinements),
             "tasks_with_passing_refinement": sum(1 for c in passing_per_task.values() if c)}
    return list(records.values()), stats


def training_pair(task: tasksets.Task, program: str, source: str, producer: str = "") -> dict:
    """A fine-tuning pair for pi_theta: the task's generation prompt and the body that follows it."""
    prompt = prompts.task_prompt(task)
    return {"task_id": task.task_id, "prompt": prompt, "completion": prompts.completion_after(program, prompt),
            "source": source, "producer": producer}


def _human_program(note: data.Annotation) -> str:
    """The human refinement after the task's prompt rebuilt from MBPP (two annotation rows store a
    prompt with mangled characters). Where the annotator also edited the prompt (imports, say), only
    the body can follow our prompt; the round's test filter drops what then fails."""
    body = (note.refinement_program[len(note.prompt):] if note.refinement_program.startswith(note.prompt)
            else note.refinement_body)
    return prompts.task_prompt(tasksets.mbpp().task(note.task_id), strip=False) + body


def refiner_records(annotations: list[data.Annotation]) -> list[dict]:
    """pi_Refine training pairs (paper: the 44 MBPP_Refine triples): refinement prompt -> human refinement."""
    records = []
    for note in annotations:
        pair = training_pair(tasksets.mbpp().task(note.task_id), _human_program(note), "human-refinement",
                             note.annotator)
        pair["prompt"] = prompts.refinement_prompt(note.failing_program, note.feedback, pair["prompt"])
        records.append(pair)
    return records


def human_refinement_records(clients: Clients, task_set: tasksets.TaskSet, items: list[FeedbackItem],
                             settings: RoundSettings) -> list[dict]:
    """Training pairs from the human refinements attached to feedback that pass their tests.

    A refinement is usable only where it continues the task's prompt (some annotators edited the prompt too).
    """
    programs = {item.record_id: (item.human_refinement, task_set.task(item.task_id)) for item in items
                if item.human_refinement.startswith(prompts.task_prompt(task_set.task(item.task_id)))}
    verdicts = execute(clients, programs, settings.timeout_s) if programs else {}
    return [{**training_pair(task, program, "human-refinement"), "feedback_record": rid}
            for rid, (program, task) in programs.items() if verdicts[rid]]


def ilf_records(settings: RoundSettings, clients: Clients, store: ArtifactStore, task_set: tasksets.TaskSet,
                serving_version: str):
    """ILF's training data: pi_Refine's passing refinements of failing programs given their feedback (and, with
    refinements+human, the passing human refinement where pi_Refine fixed nothing). Statistics include which
    feedback was used (stats["feedback"])."""
    items, feedback = training_feedback(clients, store, settings, serving_version)
    records, stats = refine_and_filter(clients, task_set, items, settings) if items else ([], {"tasks": 0})
    if settings.train_on == "refinements+human":
        fixed = {r["feedback_record"] for r in records}
        human = human_refinement_records(clients, task_set, [i for i in items if i.record_id not in fixed], settings)
        records += human
        stats["human_refinements_for_unfixed_tasks"] = len(human)
    return records, {**stats, "feedback": feedback}


def baseline_records(settings: RoundSettings, clients: Clients, task_set: tasksets.TaskSet):
    """The baselines' training data: the paper's human refinements (MBPP) or the reference solutions (gold) of
    the first settings.train_tasks annotated train tasks; only those that pass their tests are kept."""
    if task_set.name == tasksets.MBPP:
        tasks = [task_set.task(a.task_id) for a in data.annotations("train")[: settings.train_tasks or None]]
    elif settings.train_on == "human":
        raise RoundFailed(f"--train-on human: the paper's human refinements are on MBPP, not {task_set.name}; "
                          "use refinements+human for the human refinements submitted with feedback")
    else:
        tasks = [t for t in task_set.split("train") if t.reference.strip()][: settings.train_tasks or None]
    if settings.train_on == "human":
        notes = {a.task_id: a for a in data.annotations("train")}
        programs = {str(t.task_id): (_human_program(notes[t.task_id]), t) for t in tasks}
    else:
        programs = {str(t.task_id): (prompts.reference_program(t), t) for t in tasks}
    # Only programs that pass their tests are trained on, whoever wrote them.
    verdicts = execute(clients, programs, settings.timeout_s) if programs else {}
    records = [training_pair(task, program, settings.train_on) for rid, (program, task) in programs.items()
               if verdicts[rid]]
    return records, {"tasks": len(tasks), "records": len(records), "dropped_failing": len(programs) - len(records)}


def training_records(settings: RoundSettings, clients: Clients, store: ArtifactStore, task_set: tasksets.TaskSet,
                     serving_version: str):
    if settings.train_on.startswith("refinements"):
        return ilf_records(settings, clients, store, task_set, serving_version)
    return baseline_records(settings, clients, task_set)


def train(clients: Clients, dataset: str, base_version: str, settings: RoundSettings,
          purpose: str = "generation") -> training_pb2.Run:
    """Submits a fine-tuning run and follows it to its end, with a progress bar."""
    run = clients.training.SubmitRun(training_pb2.SubmitRunRequest(
        dataset=dataset, base_model_version=base_version, purpose=purpose,
        hyperparameters=training_pb2.Hyperparameters(**settings.hyperparameters(purpose))), timeout=60)
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


def serving_refiner(clients: Clients) -> str:
    """The version of pi_Refine the refinement service serves."""
    return clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest(), timeout=60).serving_version


def train_refiner(clients: Clients, store: ArtifactStore, settings: RoundSettings, tag: str) -> dict:
    """Fine-tunes pi_Refine on the MBPP_Refine triples and makes the refinement service serve it. It is trained
    from its base model (not from the previous round's pi_Refine) unless settings.stack_refiner."""
    serving = serving_refiner(clients)
    base = serving if settings.stack_refiner else Registry(store).chain(serving)[-1].version
    records = refiner_records(data.annotations("refine"))
    dataset = datasets.put_dataset(store, records, name=f"{tag}-refiner")
    run = train(clients, dataset, base, settings, purpose="refinement")
    clients.refinement.SwitchModel(refinement_pb2.RefinementSwitchRequest(model_version=run.output_model_version),
                                   timeout=LONG_CALL_S)
    return {"base_version": base, "previous_version": serving, "model_version": run.output_model_version,
            "dataset": dataset, "examples": len(records), "run_id": run.run_id}


def new_round_id() -> str:
    return f"round-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def run_round(settings: RoundSettings, clients: Clients, store: ArtifactStore, round_id: str = "") -> dict:
    """One round; serving switches only after the candidate's whole evaluation, and only through the gate."""
    started = time.monotonic()
    round_id = round_id or new_round_id()
    task_set = tasksets.TaskSets(store).get(settings.task_set)
    eval_tasks = evaluation_tasks(task_set, settings)
    report = {"round_id": round_id, "started_at": time.time(), "task_set": task_set.name,
              "eval_split_label": task_set.split_label(settings.eval_split), "settings": asdict(settings),
              "eval_task_ids": [t.task_id for t in eval_tasks]}

    before = evaluate(clients, eval_tasks, settings, label="evaluate serving model")
    report["before"] = summary(before, solved_tasks=True)
    if settings.train_on.startswith("refinements") and settings.train_refiner:
        report["refiner"] = train_refiner(clients, store, settings, round_id)
    records, report["data"] = training_records(settings, clients, store, task_set, before.model_version)
    if "feedback" in report["data"]:
        report["feedback"] = report["data"].pop("feedback")
    if not records:
        nothing = "no feedback" if report.get("feedback", {}).get("records") == 0 else "no passing refinement"
        report["outcome"] = f"{nothing}: nothing to train, the serving model is unchanged"
        report["promotion"] = {"promoted": False, "reason": "no candidate: nothing to train"}
        return _finish(report, store, started)
    dataset = datasets.put_dataset(store, records, name=f"{round_id}-{settings.train_on}")
    report["dataset"] = {"key": dataset, "records": len(records)}
    run = train(clients, dataset, before.model_version, settings)
    candidate = run.output_model_version
    report["run"] = {"run_id": run.run_id, "model_version": candidate, "final_loss": run.progress.loss}

    clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=candidate), timeout=LONG_CALL_S)
    after = evaluate(clients, eval_tasks, settings, model_version=candidate, label="evaluate candidate")
    report["after"] = summary(after, solved_tasks=True)
    promote, report["promotion"] = gate(before, after, settings)
    if promote:
        status = clients.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version=candidate),
                                                timeout=LONG_CALL_S)
        report["outcome"] = f"switched serving from {before.model_version} to {status.serving_version}"
    else:
        report["outcome"] = (f"candidate {candidate} not promoted (pass@1 change "
                             f"{after.pass_at[1] - before.pass_at[1]:+.3f}, margin {settings.promote_margin}); "
                             f"{before.model_version} keeps serving")
    return _finish(report, store, started)


def gate(before: Evaluation, after: Evaluation, settings: RoundSettings) -> tuple[bool, dict]:
    """Whether the candidate may serve: its pass@1 may drop by at most settings.promote_margin; and why."""
    change = after.pass_at[1] - before.pass_at[1]
    scores = f"pass@1 {before.pass_at[1]:.3f} -> {after.pass_at[1]:.3f} ({change:+.3f})"
    if not settings.switch:
        return False, {"promoted": False, "reason": f"{scores}; --no-switch: evaluated only"}
    if -change > settings.promote_margin:
        return False, {"promoted": False, "reason": f"{scores}: a drop of more than the margin {settings.promote_margin}"}
    return True, {"promoted": True, "reason": f"{scores}: no drop of more than the margin {settings.promote_margin}"}


def _finish(report: dict, store: ArtifactStore, started: float) -> dict:
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["markdown"] = markdown_report(report)
    prefix = f"reports/{report['round_id']}"
    if "after" in report:
        store.put(f"{prefix}/pass_at_k.png", plot_report(report))
    store.put(f"{prefix}/report.md", report["markdown"].encode())
    # report.json last: its presence says the round finished (the retraining policy relies on it)
    store.put(f"{prefix}/report.json", json.dumps(report, indent=2).encode())
    report["artifacts"] = prefix
    return report


def _counts(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def markdown_report(report: dict) -> str:
    rows = {label: {**report[label], "version": report[label]["model_version"]}
            for label in ("before", "after") if label in report}
    ks = ks_of(rows)
    lines = [f"## ILF round {report['round_id']}", "",
             *markdown_table("model", rows, ks, {"version": lambda row: f"`{row['version']}`"})]
    s = report["settings"]
    lines += ["", f"- evaluation: {len(report['eval_task_ids'])} {report['eval_split_label']} tasks, "
                  f"{s['eval_samples']} sample(s) at temperature {s['eval_temperature']}"]
    if "feedback" in report:
        f = report["feedback"]
        lines.append(f"- feedback ({f['policy']}, authors {f['authors']}): {f['records']} records on {f['tasks']} "
                     f"tasks; by program's model version: {_counts(f['by_model_version']) or 'none'}; "
                     f"by author: {_counts(f['by_author_kind']) or 'none'}")
    lines += [f"- training data ({s['train_on']}): " + _counts(report["data"]),
              f"- outcome: {report['outcome']}", f"- promotion: {report['promotion']['reason']}",
              f"- wall time: {report['wall_seconds']} s"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict) -> bytes:
    rows = {f"{label}: {report[label]['model_version']}": report[label] for label in ("before", "after")}
    return chart(rows, f"ILF round {report['round_id']}", report["eval_split_label"])
