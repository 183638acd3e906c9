"""The paper's Table 4 on one base model, end to end through the services.

Methods: zero-shot; fine-tuned on MBPP gold programs; fine-tuned on human refinements; ILF
(pi_Refine trained on MBPP_Refine, refinements of MBPP_Train failures with human feedback, test
filter, fine-tune); ILF with model-written feedback. Every method is evaluated on the same MBPP_Test
tasks with the same seeds; candidates are loaded next to the serving model, never promoted.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time

import grpc
from tqdm import tqdm

from ilf import data, datasets, tasksets
from ilf.store import ArtifactStore
from ilf.v1 import common_pb2, feedback_pb2, generation_pb2
from loop.clients import Clients
from loop.evaluation import LONG_CALL_S, evaluate, evaluation_tasks
from loop.report import chart, ks_of, markdown_table as results_table, summary
from loop.round import (FeedbackItem, baseline_records, refine_and_filter, train, train_refiner,
                        training_feedback)
from loop.settings import RoundSettings

METHODS = ("zero-shot", "gold", "human", "ilf", "ilf-model-feedback")
PAPER = {"zero-shot": (0.26, 0.59), "gold": (0.22, 0.63), "human": (0.33, 0.68), "ilf": (0.36, 0.68),
         "ilf-model-feedback": (0.25, 0.59)}  # pass@1, pass@10 (model feedback: 2-shot InstructGPT)
LABELS = {"zero-shot": "zero-shot", "gold": "fine-tuned on MBPP gold programs",
          "human": "fine-tuned on human refinements", "ilf": "ILF (human feedback)",
          "ilf-model-feedback": "ILF (model-written feedback)"}


def model_feedback_items(clients: Clients, notes: list[data.Annotation], settings: RoundSettings):
    """The annotated failing programs with feedback written by the generation model (2-shot).

    Returns the items and how many programs the model wrote no feedback for.
    """
    items, silent = [], 0
    for note in tqdm(notes, desc="model feedback", unit="task"):
        try:
            record = clients.feedback.GenerateFeedback(feedback_pb2.GenerateFeedbackRequest(
                task_id=note.task_id, program=note.failing_program, shots=2,
                params=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=128, seed=settings.seed)),
                timeout=1800)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # the model wrote only whitespace
                raise
            silent += 1
            continue
        items.append(FeedbackItem(note.task_id, note.failing_program, record.feedback, record.record_id))
    return items, silent


def reproduce(settings: RoundSettings, clients: Clients, store: ArtifactStore,
              methods: tuple[str, ...] = METHODS) -> dict:
    started = time.monotonic()
    tag = f"reproduce-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    # The paper's comparison: MBPP, and for ILF the paper's annotations of CodeGen's programs.
    settings = dataclasses.replace(settings, task_set=tasksets.MBPP, feedback="paper", feedback_authors="human")
    mbpp = tasksets.mbpp()
    tasks = evaluation_tasks(mbpp, settings)
    notes = data.annotations("train")[: settings.train_tasks or None]
    base = clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest(), timeout=60).serving_version
    report = {"id": tag, "settings": dataclasses.asdict(settings), "base_model_version": base,
              "eval_task_ids": [t.task_id for t in tasks], "methods_requested": list(methods), "methods": {}}
    refiner = None
    prefix = f"reports/{tag}"
    for method in tqdm(methods, desc="methods", unit="method"):
        row: dict = {}
        if method == "zero-shot":
            evaluation = evaluate(clients, tasks, settings, base, label="evaluate zero-shot")
        else:
            if method in ("gold", "human"):
                records, row["data"] = baseline_records(dataclasses.replace(settings, train_on=method), clients, mbpp)
            else:
                refiner = report["refiner"] = refiner or train_refiner(clients, store, settings, tag)
                items, silent = (training_feedback(clients, store, settings, base)[0], 0) if method == "ilf" \
                    else model_feedback_items(clients, notes, settings)
                records, row["data"] = refine_and_filter(clients, mbpp, items, settings) if items else ([], {})
                row["data"].update(tasks=len(notes), no_feedback_written=silent)
            if not records:
                row["outcome"] = "no training example passed the tests: nothing to fine-tune"
                report["methods"][method] = row
                _publish(report, store, prefix, started)
                continue
            dataset = datasets.put_dataset(store, records, name=f"{tag}-{method}")
            run = train(clients, dataset, base, settings)
            clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=run.output_model_version),
                                         timeout=LONG_CALL_S)
            evaluation = evaluate(clients, tasks, settings, run.output_model_version, label=f"evaluate {method}")
            row.update(dataset=dataset, run_id=run.run_id, final_loss=run.progress.loss)
        row.update(summary(evaluation))
        report["methods"][method] = row
        _publish(report, store, prefix, started)
    report["complete"] = True
    _publish(report, store, prefix, started)
    return report


def _publish(report: dict, store: ArtifactStore, prefix: str, started: float) -> None:
    """Writes the results so far, so an interrupted run keeps every method it finished."""
    report.setdefault("complete", False)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["markdown"] = markdown_table(report)
    report["artifacts"] = prefix
    store.put(f"{prefix}/results.json", json.dumps(report, indent=2).encode(), overwrite=True)
    store.put(f"{prefix}/results.md", report["markdown"].encode(), overwrite=True)
    store.put(f"{prefix}/results.png", bar_chart(report), overwrite=True)
    tqdm.write(f"results so far ({len(report['methods'])} of {len(report['methods_requested'])} methods): "
               f"{store.url}/{prefix}/results.md")


def markdown_table(report: dict) -> str:
    s = report["settings"]
    rows = {LABELS[method]: {**row, "method": method} for method, row in report["methods"].items()}
    lines = results_table("method", rows, ks_of(rows), {
        "paper pass@1 / pass@10": lambda row: "{:.2f} / {:.2f}".format(*PAPER[row["method"]]),
        "training data": lambda row: ", ".join(f"{k} {v}" for k, v in row.get("data", {}).items()
                                               if k != "refinement_model")})
    lines += ["", f"Base model `{report['base_model_version']}`; {len(report['eval_task_ids'])} "
                  f"{tasksets.mbpp().split_label(s['eval_split'])} tasks, "
                  f"{s['eval_samples']} sample(s) per task at temperature {s['eval_temperature']}, "
                  f"max {s['max_new_tokens']} new tokens, seeds from {s['seed']}; "
                  f"{s['train_tasks'] or 128} annotated MBPP_Train tasks, {s['refine_samples']} refinement(s) each; "
                  f"fine-tuning method {s['method']}. 95% intervals: bootstrap over tasks. Wall time "
                  f"{report['wall_seconds']:.0f} s."]
    if not report.get("complete", True):
        lines.append(f"Partial: {len(report['methods'])} of {len(report['methods_requested'])} methods done so far.")
    if "refiner" in report:
        lines.append(f"pi_Refine: `{report['refiner']['model_version']}` trained on "
                     f"{report['refiner']['examples']} MBPP_Refine triples.")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict) -> bytes:
    rows = {LABELS[method]: row for method, row in report["methods"].items()}
    return chart(rows, f"ILF comparison on {report['base_model_version']}",
                 tasksets.mbpp().split_label(report["settings"]["eval_split"]))
