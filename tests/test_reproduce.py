"""The whole comparison end to end through the services as processes, on a tiny model that knows a few answers by
heart (tests/memorizing_model.py), so every method trains: zero-shot, gold, human refinements, ILF with human and
with model-written feedback, rejection sampling, and two more ILF rounds on the model's own failures through the
annotation queue."""
from __future__ import annotations

import dataclasses
from collections import Counter

import grpc
import pytest

from ilf import data
from ilf.errors import InvalidArgument, NotFound
from ilf.grpc_util import free_port
from ilf.registry import Registry
from ilf.store import open_store
from ilf.v1 import feedback_pb2, generation_pb2, refinement_pb2
from loop.clients import Clients
from loop.refiner_sweep import feedback_ablation, grid, refiner_sweep
from loop.reproduce import METHODS, reproduce
from loop.settings import RoundSettings
from memorizing_model import MODEL_FEEDBACK, build_memorizing_model
from test_round_integration import ResultsHistory, assert_published_after_every_method, start_system

# Two MBPP_Test tasks, the two annotated MBPP_Train tasks the model knows, room for task A's 70-token gold body,
# greedy collection and refinement; every fine-tune (pi_Refine's one step of 44 triples, each method's one step) at
# a negligible rate keeps what the model knows, so refinements pass and each round's model fails task B with the
# program the model learnt.
SMALL = dict(eval_tasks=2, eval_samples=2, eval_temperature=0.8, train_tasks=2, refine_samples=1,
             refine_temperature=0.0, collect_samples=1, collect_temperature=0.0, max_new_tokens=96, epochs=1,
             batch_size=2, learning_rate=1e-9, refiner_epochs=1, refiner_batch_size=44, refiner_learning_rate=1e-9)


@pytest.fixture(scope="session")
def memorizing_model_dir(tmp_path_factory, tiny_model_dir):
    return build_memorizing_model(tiny_model_dir, tmp_path_factory.mktemp("memorizing-model"))


@pytest.fixture(scope="module")
def system(tmp_path_factory, memorizing_model_dir):
    services, store_url = start_system(tmp_path_factory.mktemp("reproduce"), memorizing_model_dir)
    with services:
        yield open_store(store_url), Clients.connect(**services.addresses)


def test_the_whole_comparison_trains_every_method_and_two_more_rounds(system):
    store, clients = system
    serving = clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    history = ResultsHistory(store)
    report = reproduce(RoundSettings(**SMALL), clients, history)
    rows = report["methods"]
    expected = ["zero-shot", "gold", "human", "ilf", "ilf-model-feedback", "rejection-sampling", "ilf-round-2",
                "ilf-round-3"]
    assert list(rows) == expected == report["methods_requested"] and report["complete"]
    assert "ilf-rounds" in METHODS

    # every method was trained and evaluated on the same tasks; the serving model never changed
    assert all("pass_at" in rows[m] for m in expected), report["markdown"]
    assert report["eval_task_ids"] == [11, 12]
    versions = [rows[m]["model_version"] for m in expected]
    assert versions[0] == serving and len(set(versions)) == len(expected)
    assert clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version == serving
    for row in rows.values():
        for k, value in row["pass_at"].items():
            low, high = row["interval95"][k]
            assert low <= value <= high
    assert list(rows["zero-shot"]["pass_at"]) == ["1"]  # 2 samples per task: pass@1 only
    # per-task counts behind each row, and ILF against every other row, paired over the same tasks
    assert {m: sorted(rows[m]["per_task"]) for m in expected} == {m: ["11", "12"] for m in expected}
    assert all(sum(c for _, c in rows[m]["per_task"].values()) / 4 == rows[m]["pass_at"]["1"] for m in expected)
    assert sorted(report["ilf_minus"]) == sorted(m for m in expected if m != "ilf")
    for method, by_k in report["ilf_minus"].items():
        difference, low, high = by_k["1"]
        assert difference == pytest.approx(rows["ilf"]["pass_at"]["1"] - rows[method]["pass_at"]["1"])
        assert low <= difference <= high
    assert "ILF (human feedback) minus each row, paired" in report["markdown"]

    # ILF: pi_Refine (its own hyperparameters) repaired the paper's failing programs given the paper's feedback
    refiner = Registry(store).get(report["refiner"]["model_version"])
    assert refiner.lineage["purpose"] == "refinement" and report["refiner"]["examples"] == 44
    assert refiner.lineage["hyperparameters"]["learning_rate"] == 1e-9
    assert rows["ilf"]["data"]["tasks_with_passing_refinement"] == 2
    # with the feedback the model writes itself (the feedback it learnt to write and pi_Refine learnt to repair with)
    assert rows["ilf-model-feedback"]["data"]["no_feedback_written"] == 0
    assert rows["ilf-model-feedback"]["data"]["tasks_with_passing_refinement"] == 2
    # rejection sampling: the same tasks and budget, only task A's own samples pass
    assert rows["rejection-sampling"]["data"] == {"tasks": 2, "samples": 2, "passing_samples": 1,
                                                  "tasks_with_passing_sample": 1}

    # round 2 starts from ILF's model: its failing program of task B queued, answered by the model, refined, learnt
    round2, round3 = rows["ilf-round-2"], rows["ilf-round-3"]
    assert round2["start_version"] == rows["ilf"]["model_version"]
    assert round2["collect"]["failing"] == 1 and round2["collect"]["answered_by_model"] == 1
    assert round2["feedback"]["by_author_kind"] == {"model": 1}
    assert round2["feedback"]["by_model_version"] == {rows["ilf"]["model_version"]: 1}
    assert round2["data"]["tasks_with_passing_refinement"] == 1
    assert Registry(store).get(round2["model_version"]).base_version == rows["ilf"]["model_version"]
    # round 3 from round 2's model: the same failing program is already answered, and that answer is used
    assert round3["start_version"] == round2["model_version"]
    assert round3["collect"]["queued"] == 0 and round3["feedback"]["records"] == 1
    assert Registry(store).get(round3["model_version"]).base_version == round2["model_version"]
    queue = clients.feedback.ListQueue(feedback_pb2.ListQueueRequest(task_set="mbpp"), timeout=60).items
    assert [(i.task_id, i.answered_by) for i in queue] == [(data.annotations("train")[1].task_id, "model")]
    record = clients.feedback.GetFeedback(feedback_pb2.GetFeedbackRequest(record_id=queue[0].record_id))
    assert record.feedback == MODEL_FEEDBACK and record.author_kind == feedback_pb2.AUTHOR_KIND_MODEL

    # the table, chart and JSON, written after every method (and round), so an interrupted run keeps them
    markdown = report["markdown"]
    for label in ("| fine-tuned on its own passing samples (rejection sampling) |",
                  "| ILF round 3 (model-written feedback on its own failures) |", "pass@1 per round", "lr 1e-09"):
        assert label in markdown
    assert store.get(f"{report['artifacts']}/results.png")[:4] == b"\x89PNG"
    assert_published_after_every_method(history.versions, expected)
    assert f"Partial: 1 of {len(expected)} methods" in history.versions[0]["markdown"]
    status = clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest())
    assert status.serving_version == report["refiner"]["model_version"]


def test_a_comparison_without_ilf_starts_the_rounds_from_the_base_model_and_stops_when_nothing_passes(system):
    store, clients = system
    settings = RoundSettings(**{**SMALL, "train_tasks": 1})  # task A only: the base model never fails it
    report = reproduce(settings, clients, store, methods=("zero-shot", "ilf-rounds"), rounds=2)
    rows = report["methods"]
    assert list(rows) == ["zero-shot", "ilf-round-2", "ilf-round-3"]
    assert rows["ilf-round-2"]["start_version"] == rows["zero-shot"]["model_version"]
    assert rows["ilf-round-2"]["collect"]["failing"] == 0
    assert "nothing to fine-tune" in rows["ilf-round-2"]["outcome"]
    assert rows["ilf-round-3"] == {"outcome": "not run: the previous round trained nothing"}
    assert "3: not trained" in report["markdown"]


class CountingStub:
    """A real client stub that counts the calls made through it."""

    def __init__(self, stub):
        self.stub, self.calls = stub, Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(self.stub, name)


def test_an_interrupted_comparison_resumes_with_its_finished_methods_and_the_refinements_it_stored(system):
    """The 2026-12-04 failure: the execution service refused the judging step after 45 minutes of refinements,
    which lived only in memory. Here the execution service is unreachable when the refinements are judged."""
    store, clients = system
    first = reproduce(RoundSettings(**SMALL), clients, store, methods=("zero-shot",))
    unreachable = dataclasses.replace(clients, execution=Clients.connect(execution=f"127.0.0.1:{free_port()}").execution)
    with pytest.raises(grpc.RpcError) as failure:
        reproduce(RoundSettings(**SMALL), unreachable, store, methods=("zero-shot", "ilf"), resume=first["id"])
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    prefix = first["artifacts"]
    saved = store.get_json(f"{prefix}/ilf-samples.json")
    assert len(saved["programs"]) == 2 and saved["inputs"]["budget"][0] == 1  # 2 tasks x 1 refinement
    interrupted = store.get_json(f"{prefix}/results.json")
    assert list(interrupted["methods"]) == ["zero-shot"] and "refiner" in interrupted

    refinement = CountingStub(clients.refinement)
    resumed = reproduce(RoundSettings(**SMALL), dataclasses.replace(clients, refinement=refinement), store,
                        methods=("zero-shot", "ilf"), resume=first["id"])
    assert resumed["id"] == first["id"] and resumed["complete"]
    assert resumed["methods"]["zero-shot"] == first["methods"]["zero-shot"]  # kept, not evaluated again
    assert resumed["refiner"] == interrupted["refiner"]  # pi_Refine trained once
    assert refinement.calls["Refine"] == 0  # the stored refinements were judged, not sampled again
    assert resumed["methods"]["ilf"]["data"]["tasks_with_passing_refinement"] == 2
    assert resumed["methods_requested"] == ["zero-shot", "ilf"]
    assert resumed["wall_seconds"] > first["wall_seconds"]

    # rows measured with other settings would not compare: refused, naming what differs
    with pytest.raises(InvalidArgument, match="eval_samples 2 there, 4 now"):
        reproduce(RoundSettings(**{**SMALL, "eval_samples": 4}), clients, store, resume=first["id"])
    with pytest.raises(NotFound, match="no report reproduce-nothing"):
        reproduce(RoundSettings(**SMALL), clients, store, resume="reproduce-nothing")


def test_a_comparison_on_a_store_serving_a_fine_tuned_version_starts_from_its_base_model(system):
    """`ilf reproduce` on a store where a round promoted a candidate: zero-shot is still the base model."""
    store, clients = system
    base = clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    tuned = next(v.version for v in Registry(store).list()
                 if v.base_version == base and v.lineage.get("purpose") == "generation")
    clients.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version=tuned), timeout=120)
    try:
        report = reproduce(RoundSettings(**SMALL), clients, store, methods=("zero-shot",))
    finally:
        clients.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version=base), timeout=120)
    assert (report["base_model_version"], report["serving_version"]) == (base, tuned)
    assert report["methods"]["zero-shot"]["model_version"] == base
    assert f"Base model `{base}` (the service served `{tuned}`)" in report["markdown"]


def test_the_refiner_sweep_scores_the_untrained_and_each_trained_refiner_and_restores_what_was_served(system):
    store, clients = system
    serving = clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest()).serving_version
    (config,) = grid([1], [44], [1e-9], [8])
    report = refiner_sweep(RoundSettings(**SMALL), clients, store, [config])
    rows = report["rows"]
    assert list(rows) == ["base", config.key] and report["complete"] and report["best"] == config.key
    assert rows[config.key]["steps"] == 1 and rows[config.key]["config"]["lora_rank"] == 8
    # the model repairs both annotated tasks it knows, with or without the negligible fine-tune
    assert rows["base"]["pass_at"] == rows[config.key]["pass_at"] == {"1": 1.0}
    assert "Best by the objective (then pass@1): LoRA r8, lr 1e-09, 1 epochs of batch 44 (1 steps)" in report["markdown"]
    assert clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest()).serving_version == serving
    assert store.get(f"{report['artifacts']}/results.png")[:4] == b"\x89PNG"


def test_the_feedback_ablation_pairs_right_and_shuffled_feedback_on_the_same_tasks(system):
    store, clients = system
    report = feedback_ablation(RoundSettings(**SMALL), clients, store)
    serving = clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version
    assert report["model_version"] == serving and list(report["rows"]) == ["right", "shuffled"]
    assert report["task_ids"] == [a.task_id for a in data.annotations("train")[:2]]
    difference, low, high = report["difference"]["1"]
    rows = report["rows"]
    assert difference == pytest.approx(rows["right"]["pass_at"]["1"] - rows["shuffled"]["pass_at"]["1"])
    assert low <= difference <= high
    assert "| right minus shuffled |" in report["markdown"]
