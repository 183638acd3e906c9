"""The annotation page over HTTP: roles on every route, CSRF on every post, sessions, and the pages' data, on a real
feedback server (auth on, a tokens file) with the real execution service. The browser tests are in
test_feedback_web_browser.py and use the fixtures defined here."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests

from ilf import auth, tasksets
from ilf.store import open_store
from ilf.v1 import feedback_pb2, feedback_pb2_grpc, generation_pb2
from services.execution.server import build_server as build_execution
from services.feedback.collect import per_test_results
from services.feedback.config import FeedbackConfig
from services.feedback.queue import Item, item_id_of
from services.feedback.server import build_server as build_feedback
from services.feedback.service import FeedbackService
from services.feedback.web import views
from services.feedback.web.app import WebServer
from test_security import certificates  # noqa: F401 - fixture

TOKENS = {"ada": ("annotator-ada-0123456789", "annotator"), "grace": ("annotator-grace-0123456789", "annotator"),
          "olga": ("operator-olga-0123456789", "operator"), "carl": ("client-carl-0123456789", "client")}
MODEL_VERSION = "tiny-v1"
# A small task set of the test's own, and for each task a wrong program the model might have written.
TASKS = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "split": "train",
     "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"],
     "reference": "def add(a, b):\n    return a + b"},
    {"task_id": 2, "text": "Write a function to reverse a string.", "split": "train",
     "tests": ["assert reverse('ab') == 'ba'", "assert reverse('') == ''"],
     "reference": "def reverse(s):\n    return s[::-1]"},
    {"task_id": 3, "text": "Write a function to return the square of a number.", "split": "train",
     "tests": ["assert square(3) == 9", "assert square(2) == 4"], "reference": "def square(a):\n    return a * a"},
    {"task_id": 4, "text": "Write a function to find the larger of two numbers.", "split": "test",
     "tests": ["assert larger(1, 2) == 2"], "reference": "def larger(a, b):\n    return max(a, b)"},
]
WRONG = {1: "def add(a, b):\n    return a - b\n", 2: "def reverse(s):\n    return s\n",
         3: "def square(a):\n    return a * 2\n"}


@pytest.fixture(scope="module")
def web_env(tmp_path_factory):
    """Auth on: a tokens file with two annotators, an operator and a client; the services send the client token."""
    folder = tmp_path_factory.mktemp("web")
    tokens = folder / "tokens"
    tokens.write_text("".join(f"{token} {role} {name}\n" for name, (token, role) in TOKENS.items()))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"ILF_AUTH": "on", "ILF_AUTH_TOKENS_FILE": str(tokens), "ILF_AUTH_TOKEN": TOKENS["carl"][0],
                            "ILF_HOME": str(folder / "home"), "ILF_CACHE": str(folder / "cache")}.items():
            patch.setenv(name, value)
        yield folder


@pytest.fixture(scope="module")
def web_execution(web_env):
    server = build_execution(0)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=None)


@dataclass
class Page:
    """A running feedback server with its annotation page, over a fresh store."""
    url: str
    grpc_address: str
    service: FeedbackService
    web: WebServer
    task_set: str
    items: dict[int, str]          # task id -> queue item id

    def feedback_stub(self, token: str) -> feedback_pb2_grpc.FeedbackStub:
        return feedback_pb2_grpc.FeedbackStub(grpc.intercept_channel(
            grpc.insecure_channel(self.grpc_address), auth._BearerToken(token)))


def queue_failing_programs(service: FeedbackService, task_set: tasksets.TaskSet) -> dict[int, str]:
    """Runs each wrong program through the execution service and queues it as Collect would have."""
    items = {}
    for task_id, program in WRONG.items():
        task = task_set.task(task_id)
        [result] = service.checks.run_each([(task, program)])
        assert not result.passed
        item, _ = service.queue.add(Item(item_id_of(task_set.name, task_id, program), task_set.name, task_id, program,
                                         MODEL_VERSION, per_test_results(task, result), created_at=time.time()))
        items[task_id] = item.item_id
    return items


@pytest.fixture
def start_page(web_env, web_execution, tmp_path, monkeypatch):
    """Starts feedback servers with the page on (lease length as asked) over the test's store; stops them after."""
    monkeypatch.setenv("ILF_EXECUTION_ADDR", web_execution)
    servers = []

    def start(lease_s: float = 600.0) -> Page:
        settings = FeedbackConfig.from_env(http_port=0, lease_s=lease_s)
        server = build_feedback(0, open_store(f"file://{tmp_path / 'store'}"), settings)
        server.start()
        servers.append(server)
        assert server.ready.wait(30), "the feedback service did not load"
        service = server.service.service
        task_set, _ = service.import_task_set("".join(json.dumps(row) + "\n" for row in TASKS).encode(), "arithmetic")
        return Page(server.service.web.url, f"127.0.0.1:{server.port}", service, server.service.web, task_set.name,
                    queue_failing_programs(service, task_set))
    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def page(start_page) -> Page:
    return start_page()


def store_round_report(store, round_id: str, before: tuple, after: tuple, *, promoted: bool, reason: str = "") -> None:
    """A finished round's report.json with the fields the progress page reads (as loop/round.py writes them)."""
    def evaluation(version: str, point: tuple) -> dict:
        return {"model_version": version, "pass_at": {"1": point[0]}, "interval95": {"1": list(point[1:])}}
    store.put(f"reports/{round_id}/report.json", json.dumps({
        "round_id": round_id, "started_at": time.time(), "before": evaluation("serving", before),
        "after": evaluation("candidate", after), "promotion": {"promoted": promoted, "reason": reason}}).encode())


def signed_in(page: Page, name: str) -> requests.Session:
    """An HTTP client that signed in through the form with the named token, as a browser does."""
    client = requests.Session()
    form = client.get(f"{page.url}/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    reply = client.post(f"{page.url}/signin", data={"csrf": csrf, "token": TOKENS[name][0], "next": "/queue"},
                        allow_redirects=False)
    assert reply.status_code == 303 and reply.headers["Location"] == "/queue", reply.text
    return client


def csrf_of(client: requests.Session, page: Page, path: str = "/queue") -> str:
    return re.search(r'data-csrf="([^"]+)"', client.get(f"{page.url}{path}").text).group(1)


def route_paths(page: Page, item_id: str) -> list[tuple[str, str, str | None]]:
    """(method, concrete path, role) of every route the page serves."""
    return [(r.method, r.path.replace("{item_id}", item_id), r.role) for r in page.web.page.routes]


# ---------------------------------------------------------------- roles

def test_the_annotator_role_reads_the_queue_and_answers_it_and_nothing_else(page):
    allowed = {"ilf.v1.Feedback/ListQueue", "ilf.v1.Feedback/LeaseItem", "ilf.v1.Feedback/SkipItem",
               "ilf.v1.Feedback/AnswerItem", "ilf.v1.Feedback/SubmitFeedback"}
    from ilf.v1 import execution_pb2, refinement_pb2, training_pb2
    methods = {f"{s.full_name}/{m.name}" for module in (feedback_pb2, generation_pb2, execution_pb2, refinement_pb2,
                                                        training_pb2)
               for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert {m for m in methods if auth.permits("annotator", m)} == allowed
    assert all(auth.permits("operator", m) for m in methods)
    assert not auth.permits("client", "ilf.v1.Feedback/LeaseItem") and auth.permits("client", "ilf.v1.Feedback/ListQueue")
    # Over real gRPC: the annotator lists and leases; exports and model-written feedback are refused.
    stub = page.feedback_stub(TOKENS["ada"][0])
    assert len(stub.ListQueue(feedback_pb2.ListQueueRequest(), timeout=10).items) == len(WRONG)
    assert stub.LeaseItem(feedback_pb2.LeaseItemRequest(annotator_id="ada"), timeout=10).lease_id
    for call, request in [(stub.ExportDataset, feedback_pb2.ExportDatasetRequest()),
                          (stub.GetFeedback, feedback_pb2.GetFeedbackRequest(record_id="0" * 24)),
                          (stub.AnswerWithModel, feedback_pb2.AnswerWithModelRequest())]:
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, request
    assert not auth.grants("annotator", "client")   # the generation service's HTTP routes refuse it too


def test_every_route_gives_an_anonymous_or_wrong_role_request_nothing(page):
    item_id = page.items[1]
    anonymous = requests.Session()
    annotator = signed_in(page, "ada")
    for method, path, role in route_paths(page, item_id):
        if role is None:
            continue
        reply = anonymous.request(method, f"{page.url}{path}", allow_redirects=False,
                                  data={"csrf": "x", "feedback": "y"} if method == "POST" else None)
        assert reply.status_code in (303, 401), (method, path, reply.status_code)
        if reply.status_code == 303:
            assert reply.headers["Location"].startswith("/signin?next="), (method, path)
        assert "add(" not in reply.text and item_id not in reply.text and len(reply.text) < 100, (method, path)
        # A bearer token is no way in: the page knows sessions only.
        with_header = requests.request(method, f"{page.url}{path}", allow_redirects=False,
                                       headers={"Authorization": f"Bearer {TOKENS['olga'][0]}"})
        assert with_header.status_code in (303, 401), (method, path)
        if role == "operator":
            refused = annotator.request(method, f"{page.url}{path}", allow_redirects=False,
                                        data={"csrf": csrf_of(annotator, page)} if method == "POST" else None)
            assert refused.status_code == 403 and "needs the operator role" in refused.text, (method, path)
            assert 'name="task_set"' not in refused.text and "Held now" not in refused.text
    # A client token does not open the page at all.
    client = requests.Session()
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(f"{page.url}/signin").text).group(1)
    refused = client.post(f"{page.url}/signin", data={"csrf": csrf, "token": TOKENS["carl"][0]}, allow_redirects=False)
    assert refused.status_code == 401 and "is a client" in refused.text and "ilf_session" not in refused.cookies
    wrong = client.post(f"{page.url}/signin", data={"csrf": csrf, "token": "not-a-token-at-all"}, allow_redirects=False)
    assert wrong.status_code == 401 and "ilf_session" not in wrong.cookies
    # Unknown paths are closed like pages; the open routes are the sign-in form and static files.
    assert anonymous.get(f"{page.url}/nothing-here", allow_redirects=False).status_code == 303
    assert anonymous.get(f"{page.url}/static/style.css").status_code == 200


def test_every_post_needs_the_sessions_csrf_token(page):
    annotator = signed_in(page, "olga")
    item_id = page.items[2]
    annotator.get(f"{page.url}/items/{item_id}")
    for method, path, role in route_paths(page, item_id):
        if method != "POST" or path == "/signin":
            continue
        for data, headers in [({}, {}), ({"csrf": "forged"}, {}), ({}, {"X-CSRF-Token": "forged"})]:
            reply = annotator.post(f"{page.url}{path}", data=data or None, headers=headers, allow_redirects=False,
                                   **({"json": {"program": WRONG[2]}} if path.endswith("/run") and not data else {}))
            assert reply.status_code == 403, (path, data, headers, reply.status_code)
    # Still signed in, and the item still leased: nothing above took effect.
    assert annotator.get(f"{page.url}/queue", allow_redirects=False).status_code == 200
    assert page.service.queue.get(item_id)[1].leased_by == "olga"
    # The sign-in form has its own token, in a cookie of its own.
    stranger = requests.Session()
    refused = stranger.post(f"{page.url}/signin", data={"csrf": "guess", "token": TOKENS["ada"][0]},
                            allow_redirects=False)
    assert refused.status_code == 403 and "ilf_session" not in refused.cookies


def test_session_cookie_flags_sign_out_and_revoked_tokens(page, web_env):
    client = requests.Session()
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(f"{page.url}/signin").text).group(1)
    reply = client.post(f"{page.url}/signin", data={"csrf": csrf, "token": TOKENS["ada"][0]}, allow_redirects=False)
    [cookie] = [c for c in reply.raw.headers.getlist("Set-Cookie") if c.startswith("ilf_session=")]
    session = client.cookies["ilf_session"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie        # plain HTTP here; HTTPS: test_https_sets_secure_cookies
    assert TOKENS["ada"][0] not in cookie
    page_text = client.get(f"{page.url}/queue").text
    assert "ada" in page_text and TOKENS["ada"][0] not in page_text
    client.post(f"{page.url}/signout", data={"csrf": csrf_of(client, page)}, allow_redirects=False)
    replay = requests.get(f"{page.url}/queue", cookies={"ilf_session": session}, allow_redirects=False)
    assert replay.status_code == 303 and replay.headers["Location"].startswith("/signin")
    # A token taken out of the tokens file ends its sessions at once.
    grace = signed_in(page, "grace")
    tokens = web_env / "tokens"
    original = tokens.read_text()
    try:
        tokens.write_text("".join(line + "\n" for line in original.splitlines() if "grace" not in line))
        assert grace.get(f"{page.url}/queue", allow_redirects=False).status_code == 303
    finally:
        tokens.write_text(original)


def test_https_sets_secure_cookies(page, certificates):  # noqa: F811 - fixture
    import ssl

    from services.feedback.web.app import AnnotationPage
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    server = WebServer(AnnotationPage(page.service, tokens=auth.TokenFile(Path(auth.config.get("ILF_AUTH_TOKENS_FILE"))),
                                      lease_s=60, ssl_context=context), host="127.0.0.1")
    server.start()
    try:
        assert server.url.startswith("https://")
        client = requests.Session()
        verify = str(certificates / "ca.pem")    # per call: REQUESTS_CA_BUNDLE would override a session's
        form = client.get(f"{server.url}/signin", verify=verify)
        assert "Secure" in form.headers["Set-Cookie"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        reply = client.post(f"{server.url}/signin", data={"csrf": csrf, "token": TOKENS["ada"][0]},
                            allow_redirects=False, verify=verify)
        [cookie] = [c for c in reply.raw.headers.getlist("Set-Cookie") if c.startswith("ilf_session=")]
        assert reply.status_code == 303 and "Secure" in cookie
    finally:
        server.stop()


def test_the_page_is_off_by_default_and_signs_in_by_name_when_auth_is_off(web_execution, tmp_path, monkeypatch):
    monkeypatch.setenv("ILF_EXECUTION_ADDR", web_execution)
    monkeypatch.setenv("ILF_AUTH", "off")
    monkeypatch.delenv("ILF_FEEDBACK_HTTP_PORT", raising=False)
    assert FeedbackConfig.from_env().http_port is None
    off = build_feedback(0, open_store(f"file://{tmp_path / 'off'}"))
    assert off.service.web is None
    server = build_feedback(0, open_store(f"file://{tmp_path / 'on'}"), FeedbackConfig.from_env(http_port=0))
    server.start()
    try:
        assert server.ready.wait(30)
        client = requests.Session()
        form = client.get(f"{server.service.web.url}/signin")
        assert "Authentication is off" in form.text and 'name="name"' in form.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        client.post(f"{server.service.web.url}/signin", data={"csrf": csrf, "name": "local-annotator"})
        assert "local-annotator" in client.get(f"{server.service.web.url}/queue").text
    finally:
        server.stop(0)


# ---------------------------------------------------------------- what the pages show

def test_queue_page_counts_and_filters(page):
    page.service.queue.lease("ada", item_id=page.items[1])
    lease = page.service.queue.lease("grace", item_id=page.items[2])[1]
    page.service.queue.skip(page.items[2], lease.lease_id)
    view = views.queue_view(page.service)
    assert dict(view.counts[("arithmetic", "train")]) == {"leased": 1, "skipped": 1, "open": 1}
    assert view.model_versions == [MODEL_VERSION] and view.task_sets == {page.task_set: "arithmetic"}
    assert [r.item.task_id for r in views.queue_view(page.service, views.QueueSelection(state="skipped")).rows] == [2]
    assert not views.queue_view(page.service, views.QueueSelection(model_version="other")).rows
    with pytest.raises(Exception, match="state must be one of"):
        views.QueueSelection(state="lost")
    text = signed_in(page, "olga").get(f"{page.url}/queue?state=open").text
    assert page.items[3] in text and page.items[1] not in text and MODEL_VERSION in text


def test_progress_counts_people_and_reads_the_policy_and_the_rounds(page):
    store = page.service.records.store
    record = page.service.answer(page.items[1], page.service.queue.lease("ada", item_id=page.items[1])[1].lease_id,
                                 "ada", "It subtracts; add the numbers instead.")
    assert record.annotator_id == "ada"
    view = views.progress_view(page.service)
    assert view.per_annotator[0][:3] == ("ada", 1, 0) and view.per_day[0][1] == 1 and view.new_for_policy == 1
    assert view.policy_threshold is None and view.chart is None
    store.put_json(views.POLICY_KEY, {"last_round_started_at": record.created_at + 1, "min_new_feedback": 3})
    store_round_report(store, "round-1", (0.1, 0.05, 0.15), (0.2, 0.1, 0.3), promoted=True)
    view = views.progress_view(page.service)
    assert (view.new_for_policy, view.policy_threshold) == (0, 3)
    assert [(p.round_id, p.before[0], p.after[0], p.promoted) for p in view.rounds] == [("round-1", 0.1, 0.2, True)]
    after = next(m for m in view.chart["marks"] if m["kind"] == "after")
    before = next(m for m in view.chart["marks"] if m["kind"] == "before")
    assert after["y"] < before["y"] and after["filled"]      # higher pass@1 is drawn higher
    text = signed_in(page, "ada").get(f"{page.url}/progress").text
    assert "waits for <strong>3</strong> more" in text and "round-1" in text and '<svg id="chart"' in text


def test_local_services_turn_the_page_on_for_demo_and_up_only(tmp_path, monkeypatch):
    from loop.local import LOCAL_WEB_PORT, LocalServices
    monkeypatch.delenv("ILF_FEEDBACK_HTTP_PORT", raising=False)
    assert LocalServices(tmp_path).web_url == f"http://127.0.0.1:{LOCAL_WEB_PORT}"      # ilf demo, ilf up
    assert LocalServices(tmp_path, ports={"feedback": 1}).web_port is None                # tests on their own ports
    assert LocalServices(tmp_path, ports={"feedback": 1}, web_port=0).web_port == 0
    monkeypatch.setenv("ILF_FEEDBACK_HTTP_PORT", "9123")
    assert LocalServices(tmp_path).web_port == 9123


def test_operators_fill_the_queue_from_the_page(start_page, tiny_model_dir, monkeypatch):
    from services.generation.server import build_server as build_generation
    monkeypatch.setenv("ILF_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("ILF_DEVICE", "cpu")
    generation = build_generation(0)
    generation.start()
    try:
        assert generation.ready.wait(300), "the tiny model did not load"
        monkeypatch.setenv("ILF_GENERATION_ADDR", f"127.0.0.1:{generation.port}")
        page = start_page()
        operator = signed_in(page, "olga")
        form = {"csrf": csrf_of(operator, page, "/admin"), "task_set": page.task_set, "n": "2", "max_tasks": "2",
                "temperature": "1.0", "max_new_tokens": "16"}
        reply = operator.post(f"{page.url}/admin/collect", data=form)
        assert reply.status_code == 200 and 'id="collected"' in reply.text, reply.text[-2000:]
        assert "4 samples on\n      2 tasks" in reply.text
        queued = [item for item, _ in page.service.queue.list() if item.item_id not in page.items.values()]
        assert queued and all(item.model_version for item in queued)      # the serving version wrote them
        bad = operator.post(f"{page.url}/admin/collect", data={**form, "n": "two"})
        assert bad.status_code == 422 and "whole numbers" in bad.text
    finally:
        generation.stop(0)
