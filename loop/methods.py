"""The comparison's methods beyond the paper's: rejection-sampling fine-tuning, and further ILF rounds on the
model's own failures with model-written feedback through the annotation queue."""
from __future__ import annotations

import dataclasses

from ilf import datasets, prompts, tasksets
from ilf.store import ArtifactStore
from ilf.v1 import common_pb2, feedback_pb2, generation_pb2
from loop.clients import Clients
from loop.evaluation import LONG_CALL_S, Checkpoint, Prompted, execute, sample_programs
from loop.round import collect_failures, refine_and_filter, train, training_feedback, training_pair
from loop.settings import RoundSettings

# How the model writes feedback, wherever the comparison asks it to: 2 paper annotations of the unused prompt
# split as examples, greedy.
FEEDBACK_SHOTS = 2
FEEDBACK_MAX_NEW_TOKENS = 128


def model_feedback_params(settings: RoundSettings) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_new_tokens=FEEDBACK_MAX_NEW_TOKENS, seed=settings.seed)


def rejection_sampling_records(clients: Clients, tasks: list[tasksets.Task], settings: RoundSettings,
                               model_version: str, checkpoint: Checkpoint | None = None):
    """The model's own passing programs: settings.refine_samples samples per task at settings.refine_temperature
    (ILF's refinement budget, on ILF's tasks), one passing sample per task kept as a training pair. With a
    checkpoint the samples are stored before they are judged, and read back by a later call with the same inputs."""
    requests = [Prompted(str(t.task_id), t, prompts.task_prompt(t), prompts.task_prompt(t), settings.seed + t.task_id)
                for t in tasks]
    budget = (settings.refine_samples, settings.refine_temperature, settings.max_new_tokens)

    def sample() -> tuple[dict[str, str], str]:
        programs, version = sample_programs(clients, requests, *budget, settings.concurrency, model_version,
                                            "sample for rejection sampling")
        return {rid: program for rid, (program, _) in programs.items()}, version
    inputs = {"model_version": model_version, "budget": [*budget, settings.seed],
              "prompts": [[r.key, r.prompt] for r in requests]}
    programs, version = checkpoint.sampled(inputs, sample) if checkpoint else sample()
    task_of = {r.key: r.task for r in requests}
    owner = {rid: task_of[rid.split(":")[0]] for rid in programs}  # sample ids are "<request key>:<sample>"
    verdicts = execute(clients, {rid: (program, owner[rid]) for rid, program in programs.items()},
                       settings.timeout_s) if programs else {}
    records = {}
    for rid, program in programs.items():
        task = owner[rid]
        if verdicts[rid] and task.task_id not in records:
            records[task.task_id] = training_pair(task, program, "rejection-sample", version)
    return list(records.values()), {"tasks": len(tasks), "samples": len(programs),
                                    "passing_samples": sum(verdicts.values()),
                                    "tasks_with_passing_sample": len(records)}


def fine_tune(clients: Clients, store: ArtifactStore, records: list[dict], name: str, base_version: str,
              settings: RoundSettings):
    """Stores the records as a dataset, fine-tunes base_version on them and loads the result next to the serving
    model (never promoted). Returns (dataset key, the finished run)."""
    dataset = datasets.put_dataset(store, records, name=name)
    run = train(clients, dataset, base_version, settings)
    clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=run.output_model_version),
                                 timeout=LONG_CALL_S)
    return dataset, run


def ilf_round_on_own_failures(clients: Clients, store: ArtifactStore, settings: RoundSettings, model_version: str,
                              name: str, task_ids: tuple[int, ...] = ()) -> tuple[dict, str]:
    """One ILF round from model_version: its failing programs on the train tasks (task_ids, when given) are queued
    (Collect), the serving model writes feedback on them (AnswerWithModel), pi_Refine refines the newest feedback
    per task on a program of model_version or its ancestors, and model_version is fine-tuned on the passing
    refinements.

    Returns (what the round did, the new model version; "" when no refinement passed).
    """
    settings = dataclasses.replace(settings, feedback="newest", feedback_authors="any")
    clients.generation.LoadModel(generation_pb2.LoadModelRequest(model_version=model_version), timeout=LONG_CALL_S)
    collected = collect_failures(clients, settings, model_version, task_ids)
    answered = clients.feedback.AnswerWithModel(feedback_pb2.AnswerWithModelRequest(
        task_set=settings.task_set, shots=FEEDBACK_SHOTS, params=model_feedback_params(settings)), timeout=6 * 3600)
    items, feedback = training_feedback(clients, store, settings, model_version)
    records, data = refine_and_filter(clients, tasksets.mbpp(), items, settings) if items else ([], {})
    row = {"start_version": model_version, "feedback": feedback,
           "collect": {"samples": collected.samples, "failing": collected.failing, "queued": collected.queued,
                       "answered_by_model": len(answered.records), "no_feedback_written": answered.silent},
           "data": {"tasks": len({i.task_id for i in items}), **data}}
    if not records:
        row["outcome"] = "no refinement passed the tests: nothing to fine-tune"
        return row, ""
    dataset, run = fine_tune(clients, store, records, name, model_version, settings)
    row.update(dataset=dataset, run_id=run.run_id, final_loss=run.progress.loss)
    return row, run.output_model_version
