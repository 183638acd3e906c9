"""The paper's Table 4 on one base model, end to end through the services, and what the paper did not ask.

Methods: zero-shot; fine-tuned on MBPP gold programs; fine-tuned on human refinements; ILF (pi_Refine trained
on MBPP_Refine, refinements of MBPP_Train failures with human feedback, test filter, fine-tune); ILF with
model-written feedback; rejection-sampling fine-tuning (the model's own passing samples on ILF's tasks with
ILF's sampling budget: is feedback worth more than samples?); and further ILF rounds in which the model's own
failures get model-written feedback through the annotation queue. Every method is evaluated on the same
MBPP_Test tasks with the same seeds; candidates are loaded next to the serving model, never promoted, and
nothing is chosen on MBPP_Test.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time

import grpc
from tqdm import tqdm

from ilf import data, passk, tasksets
from ilf.errors import InvalidArgument, NotFound
from ilf.registry import Registry
from ilf.store import ArtifactStore
from ilf.v1 import feedback_pb2, generation_pb2, refinement_pb2
from loop.clients import Clients
from loop.evaluation import LONG_CALL_S, Checkpoint, evaluate, evaluation_tasks
from loop.methods import (FEEDBACK_SHOTS, fine_tune, ilf_round_on_own_failures, model_feedback_params,
                          rejection_sampling_records)
from loop.report import chart, ks_of, markdown_table as results_table, publish, summary
from loop.round import (FeedbackItem, baseline_records, refine_and_filter, serving_refiner, train_refiner,
                        training_feedback)
from loop.settings import RoundSettings

METHODS = ("zero-shot", "gold", "human", "ilf", "ilf-model-feedback", "rejection-sampling", "ilf-rounds")
PAPER = {"zero-shot": (0.26, 0.59), "gold": (0.22, 0.63), "human": (0.33, 0.68), "ilf": (0.36, 0.68),
         "ilf-model-feedback": (0.25, 0.59)}  # pass@1, pass@10 (model feedback: 2-shot InstructGPT)
LABELS = {"zero-shot": "zero-shot", "gold": "fine-tuned on MBPP gold programs",
          "human": "fine-tuned on human refinements", "ilf": "ILF (human feedback)",
          "ilf-model-feedback": "ILF (model-written feedback)",
          "rejection-sampling": "fine-tuned on its own passing samples (rejection sampling)"}
ROUNDS = 2  # ILF rounds after the first, on the model's own failures

# `ilf reproduce`'s defaults: the paper's per-task sampling budget (30 refinements per annotated task at T=0.8;
# evaluation at T=0.8 on all 100 MBPP_Test tasks, 10 samples each, enough for pass@10) on the first 24 of the 128
# annotated MBPP_Train tasks, sized for 2 CPU cores. Not yet run end to end. Estimated from phases measured there:
# with bf16 (AVX512_BF16, 2026-12-02: 100 tasks x 4 samples evaluated in 190 s, 960 refinements in 8-11 min)
# about 2 h; in float32 (AVX2 only, 2026-12-03: the base evaluated in 245 s, a LoRA candidate in 404 s, 960
# refinements in 11 min 22 s, pi_Refine's 12 steps in 8 min) about 2.5 h, over the 2 h asked.
# --paper: all 128 tasks and 30 evaluation samples, for a GPU. The rounds collect one failing program per task.
DEFAULTS = {"eval_tasks": 0, "eval_samples": 10, "eval_temperature": 0.8, "train_tasks": 24, "refine_samples": 30,
            "refine_temperature": 0.8, "collect_samples": 1, "collect_temperature": 0.8}


def label(method: str) -> str:
    if method.startswith("ilf-round-"):
        return f"ILF round {method.removeprefix('ilf-round-')} (model-written feedback on its own failures)"
    return LABELS[method]


def comparison_base(clients: Clients, store: ArtifactStore) -> tuple[str, str]:
    """(the base model of the version the generation service serves, that serving version).

    Every method starts from the base model, not from whatever the channel serves: a store where an earlier round
    promoted a fine-tuned version would otherwise call that version "zero-shot". Each method loads the base next to
    the serving version again before it samples from it."""
    serving = clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest(), timeout=60).serving_version
    base = Registry(store).chain(serving)[-1].version
    if base != serving:
        tqdm.write(f"the generation service serves {serving}; the comparison starts from its base model {base}")
    return base, serving


def model_feedback_items(clients: Clients, notes: list[data.Annotation], settings: RoundSettings, model_version: str):
    """The annotated failing programs with feedback written by the generation model (2-shot).

    Returns the items and how many programs the model wrote no feedback for.
    """
    items, silent = [], 0
    for note in tqdm(notes, desc="model feedback", unit="task"):
        try:
            record = clients.feedback.GenerateFeedback(feedback_pb2.GenerateFeedbackRequest(
                task_id=note.task_id, program=note.failing_program, shots=FEEDBACK_SHOTS,
                params=model_feedback_params(settings), model_version=model_version), timeout=1800)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # the model wrote only whitespace
                raise
            silent += 1
            continue
        items.append(FeedbackItem(note.task_id, note.failing_program, record.feedback, record.record_id))
    return items, silent


def reproduce(settings: RoundSettings, clients: Clients, store: ArtifactStore,
              methods: tuple[str, ...] = METHODS, rounds: int = ROUNDS, resume: str = "") -> dict:
    """The comparison, written after every method. resume: the id of an earlier run to go on with (same settings
    and base model): its finished methods are kept, the others run, and refinements or samples it stored before
    they were judged are read back rather than sampled again."""
    started = time.monotonic()
    # The paper's comparison: MBPP, and for ILF the paper's annotations of CodeGen's programs.
    settings = dataclasses.replace(settings, task_set=tasksets.MBPP, feedback="paper", feedback_authors="human")
    mbpp = tasksets.mbpp()
    tasks = evaluation_tasks(mbpp, settings)
    notes = data.annotations("train")[: settings.train_tasks or None]
    base, serving = comparison_base(clients, store)
    requested = [m for m in methods if m != "ilf-rounds"] + (
        [f"ilf-round-{2 + r}" for r in range(rounds)] if "ilf-rounds" in methods else [])
    if resume:
        report = resumed_report(store, resume, settings, base)
        report.update(serving_version=serving, complete=False, methods_requested=list(dict.fromkeys(
            report["methods_requested"] + requested)))
        started -= report["wall_seconds"]  # the wall time of every run that wrote the report
    else:
        tag = f"reproduce-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
        report = {"id": tag, "settings": dataclasses.asdict(settings), "base_model_version": base,
                  "serving_version": serving, "eval_task_ids": [t.task_id for t in tasks],
                  "methods_requested": requested, "methods": {}}
    tag, rows = report["id"], report["methods"]
    trained = {method: row["model_version"] for method, row in rows.items() if "run_id" in row}
    prefix = f"reports/{tag}"
    for method in tqdm(methods, desc="methods", unit="method"):
        if method == "ilf-rounds":
            _rounds(report, settings, clients, store, tasks, tuple(n.task_id for n in notes), trained.get("ilf", base),
                    rounds, prefix, started)
            continue
        if method in rows:
            tqdm.write(f"{method}: finished by an earlier run of {tag}, kept")
            continue
        row: dict = {}
        checkpoint = Checkpoint(store, f"{prefix}/{method}-samples.json")
        if base != serving:  # loaded again (cheap when still loaded): the service may have unloaded it for candidates
            clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=base), timeout=LONG_CALL_S)
        if method == "zero-shot":
            evaluation = evaluate(clients, tasks, settings, base, label="evaluate zero-shot")
        else:
            if method in ("gold", "human"):
                records, row["data"] = baseline_records(dataclasses.replace(settings, train_on=method), clients, mbpp)
            elif method == "rejection-sampling":
                records, row["data"] = rejection_sampling_records(clients, [mbpp.task(n.task_id) for n in notes],
                                                                  settings, base, checkpoint)
            else:
                if "refiner" not in report:
                    report["refiner"] = train_refiner(clients, store, settings, tag)
                    _publish(report, store, prefix, started)  # a resumed run serves it again instead of training one
                else:
                    serve_refiner(clients, report["refiner"]["model_version"])
                items, silent = (training_feedback(clients, store, settings, base)[0], 0) if method == "ilf" \
                    else model_feedback_items(clients, notes, settings, base)
                records, row["data"] = refine_and_filter(clients, mbpp, items, settings, checkpoint) if items \
                    else ([], {})
                row["data"].update(tasks=len(notes), no_feedback_written=silent)
            if not records:
                row["outcome"] = "no training example passed the tests: nothing to fine-tune"
                rows[method] = row
                _publish(report, store, prefix, started)
                continue
            row["dataset"], run = fine_tune(clients, store, records, f"{tag}-{method}", base, settings)
            trained[method] = run.output_model_version
            evaluation = evaluate(clients, tasks, settings, run.output_model_version, label=f"evaluate {method}")
            row.update(run_id=run.run_id, final_loss=run.progress.loss)
        row.update(evaluated(evaluation))
        rows[method] = row
        _publish(report, store, prefix, started)
    report["complete"] = True
    _publish(report, store, prefix, started)
    return report


def resumed_report(store: ArtifactStore, report_id: str, settings: RoundSettings, base: str) -> dict:
    """The report of an earlier run, refused unless it was measured with these settings from this base model: its
    rows are compared with the new ones, so they must share seeds, tasks and budgets."""
    key = f"reports/{report_id}/results.json"
    if not store.exists(key):
        raise NotFound(f"no report {report_id} to resume in {store.url} (`ilf reports` lists them)")
    report = store.get_json(key)
    differing = sorted(name for name, value in json.loads(json.dumps(dataclasses.asdict(settings))).items()
                       if report["settings"].get(name) != value)
    if differing:
        raise InvalidArgument(f"report {report_id} was run with other settings, so its rows would not compare: "
                              + ", ".join(f"{n} {report['settings'].get(n)!r} there, {getattr(settings, n)!r} now"
                                          for n in differing))
    if report["base_model_version"] != base:
        raise InvalidArgument(f"report {report_id} started from {report['base_model_version']}, "
                              f"the generation service's base model is {base}")
    return report


def serve_refiner(clients: Clients, version: str) -> None:
    """Makes the refinement service serve the report's pi_Refine: a resumed run may find it serving another."""
    if serving_refiner(clients) != version:
        clients.refinement.SwitchModel(refinement_pb2.RefinementSwitchRequest(model_version=version),
                                       timeout=LONG_CALL_S)


def _rounds(report: dict, settings: RoundSettings, clients: Clients, store: ArtifactStore, tasks: list,
            train_task_ids: tuple[int, ...], start: str, rounds: int, prefix: str, started: float) -> None:
    """Rounds 2, 3, ... from ILF's model (the base model when ILF trained nothing), each evaluated like every
    method and collecting the model's failures on the comparison's train tasks (the annotated ones every other
    method trains on); they stop at the first round that has nothing to train on. Rounds a resumed report finished
    are kept, and the next one starts from the last one's model."""
    model = start
    for number in range(2, 2 + rounds):
        method = f"ilf-round-{number}"
        if method in report["methods"]:
            row = report["methods"][method]
            model = row["model_version"] if "run_id" in row else ""
            continue
        if not model:
            report["methods"][method] = {"outcome": "not run: the previous round trained nothing"}
            continue
        row, model = ilf_round_on_own_failures(clients, store, settings, model, f"{report['id']}-{method}",
                                               train_task_ids)
        if model:
            row.update(evaluated(evaluate(clients, tasks, settings, model, label=f"evaluate {method}")))
        report["methods"][method] = row
        _publish(report, store, prefix, started)


def evaluated(evaluation) -> dict:
    """A method's row: pass@k with intervals, and (samples, passing samples) per task for paired comparisons."""
    return {**summary(evaluation), "per_task": {str(t): list(nc) for t, nc in sorted(evaluation.results.items())}}


def ilf_differences(report: dict) -> dict:
    """ILF (human feedback) minus every other evaluated row: per k, the mean difference of pass@k over the same
    tasks and seeds with its paired bootstrap 95% interval."""
    counts = {m: {int(t): tuple(nc) for t, nc in row["per_task"].items()}
              for m, row in report["methods"].items() if "per_task" in row}
    if "ilf" not in counts:
        return {}
    ks = report["methods"]["ilf"]["pass_at"]
    return {method: {k: list(passk.paired_difference(counts["ilf"], per_task, int(k))) for k in ks}
            for method, per_task in counts.items() if method != "ilf"}


def _publish(report: dict, store: ArtifactStore, prefix: str, started: float) -> None:
    """Writes the results so far, so an interrupted run keeps every method it finished."""
    report.setdefault("complete", False)
    report["ilf_minus"] = ilf_differences(report)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["markdown"] = markdown_table(report)
    publish(store, prefix, report, bar_chart(report))
    tqdm.write(f"results so far ({len(report['methods'])} of {len(report['methods_requested'])} methods): "
               f"{store.url}/{prefix}/results.md")


def _data_cell(row: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.get("data", {}).items() if k != "refinement_model")


def markdown_table(report: dict) -> str:
    s = report["settings"]
    rows = {label(method): {**row, "method": method} for method, row in report["methods"].items()}
    lines = results_table("method", rows, ks_of(rows), {
        "paper pass@1 / pass@10": lambda row: "{:.2f} / {:.2f}".format(*PAPER[row["method"]])
        if row["method"] in PAPER else "",
        "training data": _data_cell})
    served = report["serving_version"]
    lines += ["", f"Base model `{report['base_model_version']}`"
                  + (f" (the service served `{served}`)" if served != report["base_model_version"] else "")
                  + f"; {len(report['eval_task_ids'])} "
                  f"{tasksets.mbpp().split_label(s['eval_split'])} tasks, "
                  f"{s['eval_samples']} sample(s) per task at temperature {s['eval_temperature']}, "
                  f"max {s['max_new_tokens']} new tokens, seeds from {s['seed']}; "
                  f"{s['train_tasks'] or 128} annotated MBPP_Train tasks, {s['refine_samples']} refinement(s) "
                  f"(rejection sampling: samples) each at temperature {s['refine_temperature']}; "
                  f"fine-tuning method {s['method']}. 95% intervals: bootstrap over tasks. Wall time "
                  f"{report['wall_seconds']:.0f} s."]
    if not report.get("complete", True):
        lines.append(f"Partial: {len(report['methods'])} of {len(report['methods_requested'])} methods done so far.")
    if report.get("ilf_minus"):
        lines.append("ILF (human feedback) minus each row, paired over the same tasks and seeds (mean difference "
                     "[95% bootstrap interval]): " + "; ".join(
                         f"{label(method)}: " + ", ".join(f"pass@{k} {d:+.3f} [{low:+.2f}, {high:+.2f}]"
                                                          for k, (d, low, high) in by_k.items())
                         for method, by_k in report["ilf_minus"].items()) + ".")
    if "refiner" in report:
        lines.append(f"pi_Refine: `{report['refiner']['model_version']}` trained on "
                     f"{report['refiner']['examples']} MBPP_Refine triples (LoRA rank {s['refiner_lora_rank']}, "
                     f"lr {s['refiner_learning_rate']:g}, {s['refiner_epochs']} epochs of batch "
                     f"{s['refiner_batch_size']}).")
    per_round = [(0, "zero-shot"), (1, "ilf")] + [(int(m.removeprefix("ilf-round-")), m) for m in report["methods"]
                                                  if m.startswith("ilf-round-")]
    if len(per_round) > 2:
        lines.append("pass@1 per round (0: zero-shot, 1: ILF with human feedback, then model-written feedback on "
                     f"the model's own failures, {s['collect_samples']} collected sample(s) per task): " + " -> ".join(
                         f"{n}: {_pass1(report['methods'].get(m, {}))}" for n, m in per_round))
    return "\n".join(lines) + "\n"


def _pass1(row: dict) -> str:
    return f"{row['pass_at']['1']:.3f}" if "pass_at" in row else "not trained"


def bar_chart(report: dict) -> bytes:
    rows = {label(method): row for method, row in report["methods"].items()}
    return chart(rows, f"ILF comparison on {report['base_model_version']}",
                 tasksets.mbpp().split_label(report["settings"]["eval_split"]))
