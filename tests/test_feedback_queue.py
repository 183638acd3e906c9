"""The annotation queue: expiring leases, skips, answers checked through the real execution service, restarts."""
from __future__ import annotations

import time

import grpc
import pytest

from ilf import prompts
from ilf.errors import FailedPrecondition, InvalidArgument, NotFound
from ilf.store import open_store
from ilf.v1 import feedback_pb2
from services.feedback.queue import ANSWERED, LEASED, QUEUED, Item, Queue, item_id_of
from test_feedback import execution_address, rejected, start_feedback, store_url  # noqa: F401 - fixtures
from test_tasksets import passing_program, user_jsonl, user_task_set


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing_item(task_id: int, body: str = "    return 0\n", model_version: str = "v-test") -> Item:
    task_set = user_task_set()
    program = prompts.task_prompt(task_set.task(task_id), strip=False) + body
    return Item(item_id=item_id_of(task_set.name, task_id, program), task_set=task_set.name, task_id=task_id,
                program=program, model_version=model_version, created_at=time.time() + task_id)


def test_leases_expire_and_the_item_is_offered_again(tmp_path):
    clock = Clock()
    queue = Queue(open_store(f"file://{tmp_path}"), clock=clock)
    first, second = failing_item(1), failing_item(2)
    assert queue.add(first) == (first, True) and queue.add(first) == (first, False)  # one item per program
    queue.add(second)
    _, ana = queue.lease("ana", lease_s=60)
    item, bob = queue.lease("bob", lease_s=60)
    assert item == second and ana.lease_id != bob.lease_id  # ana holds the oldest: bob gets the next one
    assert queue.lease("ana")[1].lease_id == ana.lease_id  # asking again returns the lease she holds
    with pytest.raises(NotFound, match="no queued item for carl"):
        queue.lease("carl")
    clock.now += 61
    item, carl = queue.lease("carl")  # both leases ran out: the oldest is offered again
    assert item == first and carl.state == LEASED and carl.leased_by == "carl"
    with pytest.raises(FailedPrecondition, match="no longer valid; carl holds it now"):
        queue.check_lease(first.item_id, ana.lease_id)
    queue.check_lease(second.item_id, bob.lease_id)  # expired, but nobody took it since: still bob's
    _, skipped = queue.skip(first.item_id, carl.lease_id, "not my language")
    assert skipped.state == QUEUED and skipped.skipped_by == ["carl"]
    assert queue.lease("carl")[0] == second  # carl is not offered what he skipped
    with pytest.raises(FailedPrecondition, match="leased by carl"):
        queue.lease("dan", item_id=second.item_id)
    with pytest.raises(InvalidArgument, match="lease_seconds"):
        queue.lease("ana", lease_s=-1)


def test_two_processes_never_take_the_same_item(tmp_path):
    store = open_store(f"file://{tmp_path}")
    Queue(store).add(failing_item(1))
    one, other = Queue(store), Queue(store)  # both read the same state
    one.lease("ana")
    # the other's view is stale; writing the next event fails, it re-reads and sees ana's lease
    with pytest.raises(NotFound):
        other.lease("bob")
    assert other.get(failing_item(1).item_id)[1].leased_by == "ana"
    assert len(store.list("feedback/queue/events/")) == 1


def answer_request(item: feedback_pb2.QueueItem, **changes) -> feedback_pb2.AnswerItemRequest:
    task = user_task_set().task(item.task_id)
    fields = dict(item_id=item.item_id, lease_id=item.lease_id, annotator_id=item.leased_by,
                  feedback="Return the sum of the two arguments, not 0.", human_refinement=passing_program(task))
    return feedback_pb2.AnswerItemRequest(**{**fields, **changes})


def test_answers_are_checked_kept_once_and_survive_a_restart(start_feedback, store_url):
    store = open_store(store_url)
    first = start_feedback()
    task_set = first.ImportTaskSet(feedback_pb2.ImportTaskSetRequest(jsonl=user_jsonl()), timeout=120).name
    for task_id in (1, 2, 3):
        Queue(store).add(failing_item(task_id))
    restarted = start_feedback()  # reads the queue from the store
    lease = restarted.LeaseItem(feedback_pb2.LeaseItemRequest(annotator_id="ana", task_set=task_set), timeout=30)
    assert lease.task_id == 1 and lease.state == feedback_pb2.QUEUE_STATE_LEASED and lease.lease_id
    assert lease.task_text == "Return the sum of two numbers." and lease.model_version == "v-test"
    for changes, code, reason in [
            (dict(lease_id="f" * 16), grpc.StatusCode.FAILED_PRECONDITION, "no longer valid"),
            (dict(human_refinement=failing_item(1).program), grpc.StatusCode.INVALID_ARGUMENT, "does not pass"),
            (dict(feedback=""), grpc.StatusCode.INVALID_ARGUMENT, "feedback is empty")]:
        error = rejected(restarted.AnswerItem, answer_request(lease, **changes))
        assert error.code() == code and reason in error.details(), error.details()
    record = restarted.AnswerItem(answer_request(lease), timeout=60)
    assert (record.task_set, record.program_model_version, record.queue_item, record.source) == (
        task_set, "v-test", lease.item_id, "queue")
    assert record.split == "train" and record.tests.checked and record.tests.refinement_passed
    # a retried answer (say, after a lost reply) is the stored record; a different one is refused
    assert restarted.AnswerItem(answer_request(lease), timeout=60) == record
    error = rejected(restarted.AnswerItem, answer_request(lease, feedback="Something else."))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already answered" in error.details()
    bob = restarted.LeaseItem(feedback_pb2.LeaseItemRequest(annotator_id="bob", lease_seconds=300), timeout=30)
    carl = restarted.LeaseItem(feedback_pb2.LeaseItemRequest(annotator_id="carl"), timeout=30)
    restarted.SkipItem(feedback_pb2.SkipItemRequest(item_id=carl.item_id, lease_id=carl.lease_id), timeout=30)
    before = restarted.ListQueue(feedback_pb2.ListQueueRequest(), timeout=30).items

    again = start_feedback()  # a restart mid-queue: every state and every lease is still there
    after = again.ListQueue(feedback_pb2.ListQueueRequest(), timeout=30).items
    assert list(after) == list(before)
    assert [(i.task_id, i.state) for i in after] == [(1, feedback_pb2.QUEUE_STATE_ANSWERED),
                                                     (2, feedback_pb2.QUEUE_STATE_LEASED),
                                                     (3, feedback_pb2.QUEUE_STATE_QUEUED)]
    assert after[0].record_id == record.record_id and after[0].answered_by == "human"
    assert after[2].skipped_by == ["carl"] and not after[1].lease_id  # lease ids go only to their holder
    answered = again.AnswerItem(answer_request(bob, feedback="Reverse it: return s[::-1]."), timeout=60)
    assert answered.queue_item == bob.item_id
    assert again.GetFeedback(feedback_pb2.GetFeedbackRequest(record_id=record.record_id), timeout=30) == record
    queued = again.ListQueue(feedback_pb2.ListQueueRequest(state=feedback_pb2.QUEUE_STATE_QUEUED), timeout=30).items
    assert [i.task_id for i in queued] == [3]
    # every state change is its own immutable object
    events = [k for k in store.list("feedback/queue/events/") if k.endswith(".json")]
    assert len(events) == 6  # ana, bob: leased and answered; carl: leased and skipped
    assert {Queue(store).get(i.item_id)[1].state for i in after} == {ANSWERED, QUEUED}
