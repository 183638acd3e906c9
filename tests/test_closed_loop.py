"""The closed loop, with the services as separate processes and the tiny model: a team's own task set, the serving
model's failures queued and answered (by people and by the model), the retraining policy starting round 1 by
itself, the new serving version's failures answered in turn, round 2 learning from them, and the history of both."""
from __future__ import annotations

import dataclasses

import grpc

from cli.main import main as ilf
from ilf.registry import Registry
from ilf.v1 import common_pb2, feedback_pb2, generation_pb2
from loop import history
from loop.retrain import STATE_KEY, attempts, policy_state, recover, retrain_when_due
from loop.round import collect_failures
from loop.settings import RoundSettings
from ilf import datasets
from test_round_integration import system  # noqa: F401 - fixture: the services as processes, the tiny model
from test_tasksets import passing_program, user_jsonl, user_task_set

HUMAN_FEEDBACK = {1: "It returns 0; return a + b.", 2: "Return the string reversed: s[::-1].",
                  3: "Multiply the number by itself."}


def serving(clients) -> str:
    return clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest(), timeout=60).serving_version


def answer_as_people(clients, task_set: str, model_version: str, annotator: str,
                     done: set[int] = frozenset()) -> list[feedback_pb2.FeedbackRecord]:
    """Leases the queued items of model_version's programs and answers one per task (but those in `done`) with
    feedback and a passing refinement; skips the rest."""
    records, answered_tasks = [], set(done)
    while True:
        try:
            item = clients.feedback.LeaseItem(feedback_pb2.LeaseItemRequest(
                annotator_id=annotator, task_set=task_set, lease_seconds=120), timeout=60)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()  # nothing left for this annotator
            return records
        if item.model_version != model_version or item.task_id in answered_tasks:
            clients.feedback.SkipItem(feedback_pb2.SkipItemRequest(item_id=item.item_id, lease_id=item.lease_id),
                                      timeout=60)
            continue
        assert item.tests and all(t.test for t in item.tests)  # the per-test results came with the item
        records.append(clients.feedback.AnswerItem(feedback_pb2.AnswerItemRequest(
            item_id=item.item_id, lease_id=item.lease_id, annotator_id=annotator,
            feedback=HUMAN_FEEDBACK[item.task_id],
            human_refinement=passing_program(user_task_set().task(item.task_id))), timeout=120))
        answered_tasks.add(item.task_id)


def test_the_serving_models_failures_get_feedback_and_the_next_rounds_learn_from_them(
        system, tmp_path, monkeypatch, capsys):
    services, store, clients = system
    monkeypatch.setenv("ILF_STORE", store.url)
    monkeypatch.setenv("ILF_FEEDBACK_ADDR", services.addresses["feedback"])
    monkeypatch.setenv("ILF_GENERATION_ADDR", services.addresses["generation"])
    name = user_task_set().name
    (tmp_path / "team.jsonl").write_bytes(user_jsonl())
    assert ilf(["tasksets", "import", str(tmp_path / "team.jsonl")]) == 0
    assert f"imported: {name}" in capsys.readouterr().out
    base = serving(clients)
    settings = RoundSettings(task_set=name, eval_tasks=0, eval_samples=1, eval_temperature=0.0, train_tasks=0,
                             collect_samples=2, collect_temperature=0.8, max_new_tokens=12, refine_samples=1,
                             train_on="refinements+human", epochs=1, batch_size=2)

    # the serving (base) model's failures are queued, each with its per-test results
    assert ilf(["collect", "--task-set", name, "--collect-samples", "2", "--max-new-tokens", "12"]) == 0
    assert f"{base}: 6 samples of 3 tasks, 6 failing" in capsys.readouterr().out
    queue = clients.feedback.ListQueue(feedback_pb2.ListQueueRequest(task_set=name), timeout=60).items
    assert queue and {i.model_version for i in queue} == {base} and {i.task_id for i in queue} == {1, 2, 3}
    again = collect_failures(clients, settings)  # the same seeds write the same programs: nothing new
    assert again.failing == 6 and again.queued == 0 and again.duplicates == 6

    # a lease held across a restart of the feedback service is still good afterwards
    held = clients.feedback.LeaseItem(feedback_pb2.LeaseItemRequest(annotator_id="ana", task_set=name), timeout=60)
    services.restart("feedback")
    first = [clients.feedback.AnswerItem(feedback_pb2.AnswerItemRequest(
        item_id=held.item_id, lease_id=held.lease_id, annotator_id="ana", feedback=HUMAN_FEEDBACK[held.task_id],
        human_refinement=passing_program(user_task_set().task(held.task_id))), timeout=120)]
    first += answer_as_people(clients, name, base, "bob", done={held.task_id})
    assert {r.task_id for r in first} == {1, 2, 3} and {r.program_model_version for r in first} == {base}
    # what no one answered gets model-written feedback, recorded as the model's (whatever a random model writes)
    written = []
    for seed in range(7, 17):
        reply = clients.feedback.AnswerWithModel(feedback_pb2.AnswerWithModelRequest(
            task_set=name, max_items=1, params=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=16,
                                                                         seed=seed)), timeout=600)
        written += reply.records
        if written:
            break
    assert written and written[0].author_kind == feedback_pb2.AUTHOR_KIND_MODEL and written[0].source == "queue-model"
    assert written[0].program_model_version == base

    # the retraining policy sees the new human feedback and starts round 1 by itself
    [round1] = retrain_when_due(settings, clients, store, min_new_feedback=3, poll_seconds=0.2, max_rounds=1,
                                max_wait_seconds=30)
    assert round1["feedback"]["by_model_version"] == {base: 3} and round1["feedback"]["by_author_kind"] == {"human": 3}
    assert round1["promotion"]["promoted"], round1["markdown"]
    first_version = round1["run"]["model_version"]
    assert serving(clients) == first_version and Registry(store).get(first_version).base_version == base

    # the new serving version's failures are collected (other seeds: other samples), answered, learnt from
    second = collect_failures(clients, dataclasses.replace(settings, seed=settings.seed + 100))
    assert second.model_version == first_version and second.queued
    answered = answer_as_people(clients, name, first_version, "carl")
    assert answered and {r.program_model_version for r in answered} == {first_version}
    [round2] = retrain_when_due(settings, clients, store, min_new_feedback=len(answered), poll_seconds=0.2,
                                max_rounds=1, max_wait_seconds=30)
    assert round2["before"]["model_version"] == first_version
    assert round2["feedback"]["by_model_version"].get(first_version) == len(answered)
    trained_on = {r["feedback_record"] for r in datasets.read_dataset(store, round2["dataset"]["key"])}
    programs_of = {clients.feedback.GetFeedback(feedback_pb2.GetFeedbackRequest(record_id=rid),
                                                timeout=60).program_model_version for rid in trained_on}
    assert first_version in programs_of  # round 2 learnt from feedback on round 1's model's programs
    # pi_Refine was trained from its base model both times, not stacked on round 1's pi_Refine
    assert round2["refiner"]["base_version"] == round1["refiner"]["base_version"]
    assert round2["refiner"]["previous_version"] == round1["refiner"]["model_version"]

    # a round that fails (here: refused, no human refinements of the paper on this task set) is recorded and
    # retried later, and serving stays as it was
    failing = dataclasses.replace(settings, train_on="human")
    assert retrain_when_due(failing, clients, store, min_new_feedback=0, poll_seconds=0.1, max_rounds=1,
                            max_wait_seconds=3, retry_seconds=0.5) == []
    failures = [a for a in attempts(store) if a["status"] == "failed"]
    assert len(failures) >= 2 and all("paper's human refinements are on MBPP" in a["error"] for a in failures)
    now_serving = round2["run"]["model_version"] if round2["promotion"]["promoted"] else first_version
    assert serving(clients) == now_serving and policy_state(store)["failures"] == len(failures)

    # a restarted policy does not run a finished round again; nothing new arrived
    store.put_json(STATE_KEY, {**policy_state(store), "retry_after": 0.0}, overwrite=True)
    assert retrain_when_due(settings, clients, store, min_new_feedback=1, poll_seconds=0.1, max_rounds=1,
                            max_wait_seconds=1) == []
    # one that stopped mid-round is recorded as failed and tried again later
    state = policy_state(store)
    store.put_json(STATE_KEY, {**state, "running": {"round_id": "round-interrupted", "started_at": 1.0,
                                                    "new_feedback": 2}}, overwrite=True)
    assert recover(store, retry_seconds=3600)["retry_after"] > 0
    assert retrain_when_due(settings, clients, store, min_new_feedback=0, poll_seconds=0.1, max_rounds=1,
                            max_wait_seconds=1) == []  # due, but not before its retry time
    assert {a["round_id"]: a["status"] for a in attempts(store)}["round-interrupted"] == "failed"

    # every round, with versions, feedback, pass@1 before and after, and the plot
    assert ilf(["history", "--plot", str(tmp_path / "history.png")]) == 0
    out = capsys.readouterr().out
    assert [r["round_id"] for r in history.rounds(store) if "failed" not in r] == [round1["round_id"],
                                                                                  round2["round_id"]]
    for report in (round1, round2):
        assert report["round_id"] in out and f"`{report['run']['model_version']}`" in out
    assert "failed: interrupted" in out and (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
