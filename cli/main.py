"""The `ilf` command: serve a service, start them all, run an ILF round, manage model versions."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import signal
import sys
import time
from pathlib import Path

from ilf import config

SERVICE_NAMES = ("generation", "refinement", "execution", "training", "feedback")


def _round_settings(args):
    from loop.settings import RoundSettings
    fields = {f.name for f in dataclasses.fields(RoundSettings)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("promote_margin") is None:
        values["promote_margin"] = config.get("ILF_PROMOTE_MARGIN")
    return RoundSettings(**values)


def _add_round_flags(parser: argparse.ArgumentParser) -> None:
    from loop.settings import FEEDBACK_AUTHORS, FEEDBACK_POLICIES, TRAIN_SOURCES, RoundSettings
    d = RoundSettings()
    parser.add_argument("--task-set", default=d.task_set, help="mbpp, or a task set imported with `ilf tasksets import`")
    parser.add_argument("--eval-tasks", type=int, default=d.eval_tasks, help="tasks to evaluate (0: all; MBPP_Test has 100)")
    parser.add_argument("--eval-split", choices=("test", "dev"), default=d.eval_split,
                        help="test: MBPP_Test; dev: unannotated MBPP_Train tasks, for choosing settings without MBPP_Test")
    parser.add_argument("--feedback", choices=FEEDBACK_POLICIES, default=d.feedback,
                        help="newest: per task the newest feedback on a program of the serving model or its ancestors; "
                             "all: every such record; paper: the paper's annotations (MBPP)")
    parser.add_argument("--feedback-authors", choices=FEEDBACK_AUTHORS, default=d.feedback_authors,
                        help="any: model-written feedback counts too")
    parser.add_argument("--collect-samples", type=int, default=d.collect_samples,
                        help="`ilf collect`: samples per train task")
    parser.add_argument("--collect-temperature", type=float, default=d.collect_temperature)
    parser.add_argument("--stack-refiner", action="store_true",
                        help="train pi_Refine from its current version instead of from its base model")
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per task (paper: 30)")
    parser.add_argument("--eval-temperature", type=float, default=d.eval_temperature, help="paper: 0.8")
    parser.add_argument("--train-tasks", type=int, default=d.train_tasks,
                        help="train-split tasks to collect on and refine (0: all; MBPP has 128)")
    parser.add_argument("--refine-samples", type=int, default=d.refine_samples)
    parser.add_argument("--refine-temperature", type=float, default=d.refine_temperature)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--train-on", choices=TRAIN_SOURCES, default=d.train_on)
    parser.add_argument("--method", choices=("lora", "full"), default=d.method)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help="pi_theta's LoRA rank (0: the service's)")
    parser.add_argument("--refiner-method", choices=("lora", "full"), default=d.refiner_method,
                        help="pi_Refine's fine-tuning (its settings were chosen by `ilf refiner-sweep`)")
    parser.add_argument("--refiner-learning-rate", type=float, default=d.refiner_learning_rate)
    parser.add_argument("--refiner-epochs", type=int, default=d.refiner_epochs)
    parser.add_argument("--refiner-batch-size", type=int, default=d.refiner_batch_size)
    parser.add_argument("--refiner-lora-rank", type=int, default=d.refiner_lora_rank)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight per service")
    parser.add_argument("--promote-margin", type=float, default=None,
                        help="switch only if pass@1 drops by at most this much (default: ILF_PROMOTE_MARGIN, 0)")
    parser.add_argument("--no-switch", dest="switch", action="store_false", help="evaluate but keep serving as is")
    parser.add_argument("--no-train-refiner", dest="train_refiner", action="store_false",
                        help="refine with the refinement service's current model instead of training pi_Refine first")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's settings: all 100 test tasks, 30 samples at T=0.8, all 128 train tasks")


def _apply_paper(args) -> None:
    if args.paper:
        args.eval_tasks, args.eval_samples, args.eval_temperature, args.train_tasks = 0, 30, 0.8, 0
        args.refine_samples = 30


def artifact_url(key: str) -> str:
    """Where an artifact of the store is, as an absolute URL a person can open or pass to another command."""
    from ilf.store import open_store
    return f"{open_store().url.rstrip('/')}/{key.lstrip('/')}"


def cmd_serve(args) -> None:
    importlib.import_module(f"services.{args.service}.server").main()


def cmd_round(args) -> int:
    from loop.clients import Clients
    from loop.round import run_round
    from ilf.store import open_store
    _apply_paper(args)
    report = run_round(_round_settings(args), Clients.connect(), open_store())
    print(report["markdown"])
    print(f"artifacts: {artifact_url(report['artifacts'])}")
    return 0


def cmd_demo(args) -> int:
    """Starts the services as local processes, runs one round, stops them."""
    from loop.clients import Clients
    from loop.local import LocalServices
    from loop.round import run_round
    from ilf.store import open_store
    _apply_paper(args)
    started = time.monotonic()
    log_dir = Path(config.get("ILF_HOME")) / "logs"
    print(f"starting the services (logs in {log_dir}); the first start converts SmolLM2 once", flush=True)
    with LocalServices(log_dir) as services:
        print(f"services up after {time.monotonic() - started:.0f} s: {services.addresses}", flush=True)
        report = run_round(_round_settings(args), Clients.connect(**services.addresses), open_store())
    print(report["markdown"])
    print(f"artifacts: {artifact_url(report['artifacts'])}")
    print(f"demo wall time: {time.monotonic() - started:.0f} s")
    return 0


def _run_on_services(args, experiment) -> int:
    """Runs experiment(settings, clients, store) and prints its table; with --local the services are started
    here and stopped after."""
    from contextlib import nullcontext

    from loop.clients import Clients
    from loop.local import LocalServices
    from ilf.store import open_store
    _apply_paper(args)
    context = LocalServices(Path(config.get("ILF_HOME")) / "logs") if args.local else nullcontext()
    with context as services:
        clients = Clients.connect(**services.addresses) if services else Clients.connect()
        report = experiment(_round_settings(args), clients, open_store())
    print(report["markdown"])
    print(f"artifacts: {artifact_url(report['artifacts'])}")
    return 0


def cmd_reproduce(args) -> int:
    """The paper's comparison (and rejection sampling, and further rounds)."""
    from loop.reproduce import reproduce
    return _run_on_services(args, lambda settings, clients, store: reproduce(
        settings, clients, store, tuple(args.methods), rounds=args.rounds, resume=args.resume))


def cmd_refiner_sweep(args) -> int:
    """pi_Refine's fine-tuning settings scored on MBPP_Train (never MBPP_Test)."""
    from loop.refiner_sweep import grid, refiner_sweep
    configs = grid(args.sweep_epochs, args.sweep_batch_sizes, args.sweep_learning_rates, args.sweep_lora_ranks)
    return _run_on_services(args, lambda settings, clients, store: refiner_sweep(
        settings, clients, store, configs, include_base=args.base))


def cmd_feedback_ablation(args) -> int:
    """1-shot refinement without fine-tuning, the right feedback vs shuffled feedback, on MBPP_Train."""
    from loop.refiner_sweep import feedback_ablation
    return _run_on_services(args, feedback_ablation)


def cmd_retrain(args) -> int:
    from loop.clients import Clients
    from loop.retrain import retrain_when_due
    from ilf.store import open_store
    _apply_paper(args)
    _serve_metrics()
    reports = retrain_when_due(_round_settings(args), Clients.connect(), open_store(),
                               min_new_feedback=args.min_new_feedback, poll_seconds=args.poll_seconds,
                               max_rounds=args.max_rounds, max_wait_seconds=args.max_wait_seconds,
                               retry_seconds=args.retry_seconds)
    for report in reports:
        print(report["markdown"])
    print(f"{len(reports)} round(s) run")
    return 0


def cmd_up(args) -> int:
    from loop.local import LocalServices
    with LocalServices(Path(config.get("ILF_HOME")) / "logs") as services:
        print(json.dumps(services.addresses), flush=True)
        try:
            while all(p.poll() is None for p in services.processes.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_models(args) -> int:
    from ilf.registry import Registry
    from ilf.store import open_store
    store = open_store()
    registry = Registry(store)
    if args.action == "show" and not args.version:
        raise UsageError("ilf models show needs a VERSION (see `ilf models list`)")
    if args.action == "status":
        print_fleet_status(registry)
    elif args.action == "list":
        serving = {ch: registry.serving_version(ch) for ch in ("generation", "refinement")}
        versions = registry.list()
        if not versions:
            print(f"no model versions in {store.url} yet: a generation or refinement service registers the base "
                  "model when it first starts")
        for version in versions:
            marks = [ch for ch, v in serving.items() if v == version.version]
            print(f"{version.version:48s} {version.kind:5s} base={version.base_version or version.source:40s} "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(version.created_at))}"
                  + (f"  serving: {', '.join(marks)}" if marks else ""))
    elif args.action == "show":
        print(json.dumps(dataclasses.asdict(registry.get(args.version)), indent=2))
    elif args.action == "history":
        events = registry.events(args.channel)
        if not events:
            print(f"the {args.channel} channel has never been switched in {store.url}")
        for event in events:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(event['updated_at']))} {event['version']} "
                  f"by {event['by']} {event.get('reason', '')}")
    return 0


def print_fleet_status(registry) -> None:
    """Each channel's serving pointer, and what every replica that reported in the last hour serves."""
    from ilf.fleet import read_reports
    from loop.fleet import CHANNELS
    now = time.time()
    for channel in CHANNELS:
        pointer = registry.serving(channel)
        if not pointer:
            print(f"{channel}: serves nothing yet")
            continue
        canary = pointer.get("canary")
        print(f"{channel}: pointer at {pointer['version']}" + (f", canary {canary['version']} at {canary['share']:.0%}"
                                                               if canary else "")
              + f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(pointer['updated_at']))} UTC, "
                f"{pointer.get('reason') or 'by ' + pointer.get('by', '?')})")
        reports = [r for r in read_reports(registry, channel) if now - r.updated_at < 3600]
        if not reports:
            print("  no replica has reported in the last hour")
        for r in reports:
            state = "live" if r.alive(now) else "gone"
            canary_part = f" canary {r.canary_version} ({r.canary_share:.0%})" if r.canary_version else ""
            print(f"  {r.replica:40s} {state:7s} serving {r.serving_version}{canary_part}  "
                  f"loaded: {', '.join(r.loaded_versions) or '-'}  reported {now - r.updated_at:.0f} s ago"
                  + (f"\n    error: {r.error}" if r.error else ""))


def cmd_promote(args) -> int:
    """Moves a channel's serving pointer (to a version, back, or through a canary) and waits for every replica."""
    from ilf.registry import Registry
    from ilf.store import open_store
    from loop import fleet
    registry = Registry(open_store())
    if args.canary is not None:
        return _canary(args, registry)
    promotion = (fleet.promote(registry, args.channel, args.version, args.deadline) if args.version
                 else fleet.rollback(registry, args.channel, args.deadline))
    print(f"{args.channel}: {promotion.wait.describe(f'serve {promotion.version}')}")
    if promotion.restored:
        print(f"no replica could load {promotion.version}: the pointer is back on {promotion.restored}")
    return 0 if promotion.ok or not promotion.wait.replicas else 1


def _canary(args, registry) -> int:
    from loop import fleet
    from loop.clients import Clients
    if args.channel != "generation" or not args.version:
        raise UsageError("a canary (--canary SHARE) promotes a VERSION on the generation channel")
    settings = _round_settings(args)
    result = fleet.canary(Clients.connect(), registry, args.version, args.canary, settings, margin=args.margin,
                          deadline_s=args.deadline)
    print(f"canary {args.version} at {args.canary:.0%} next to {result.serving_version}: "
          f"{result.started.describe('routed it')}")
    print(f"{'promoted' if result.promoted else 'rolled back'}: {result.reason}")
    if result.ended:
        goal = f"serve {args.version}" if result.promoted else f"serve only {result.serving_version}"
        print(f"generation: {result.ended.describe(goal)}")
    return 0 if result.promoted else 1


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except on on/off flags (whose default is the flag's absence)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """A command was called wrongly; the message says how to call it."""


def version() -> str:
    try:
        return importlib.metadata.version("ilf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def cmd_config(args) -> int:
    from ilf import config
    print(config.markdown_table() if args.defaults else config.effective_table())
    return 0


def cmd_reports(args) -> int:
    """Every report in the store (rounds, comparisons), newest last, as absolute URLs."""
    from ilf.store import open_store
    store = open_store()
    keys = sorted(k for k in store.list("reports/") if k.endswith((".md", ".json", ".png")))
    if not keys:
        print(f"no reports in {store.url} yet: `ilf round`, `ilf demo` and `ilf reproduce` write them")
    for key in keys:
        print(artifact_url(key))
    return 0


def one_line(error: BaseException) -> str:
    """What went wrong and what to do, in one line, for errors a user can cause."""
    import grpc
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return (f"a service is unreachable ({error.details()}): start it (`ilf up`, or `ilf serve NAME`) or point "
                    "ILF_<SERVICE>_ADDR at it")
        return f"the service answered {error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def _add_promote_parsers(sub) -> None:
    from loop.fleet import CHANNELS
    from loop.settings import RoundSettings
    d = RoundSettings()
    promote = sub.add_parser("promote", help="serve a model version on every replica (or try it as a canary first)")
    promote.add_argument("version")
    promote.add_argument("--canary", type=float, default=None, metavar="SHARE",
                         help="serve VERSION to this share of new requests while pass@1 of both versions is measured, "
                              "then promote it or roll it back on the measurement")
    promote.add_argument("--margin", type=float, default=d.promote_margin,
                         help="a canary is promoted when its pass@1 is at most this much below the serving version's")
    promote.add_argument("--task-set", default=d.task_set, help="the canary's held-out tasks come from this task set")
    promote.add_argument("--eval-split", choices=("test", "dev"), default="dev",
                         help="the canary's held-out split (dev: tasks never trained on, MBPP_Test left alone)")
    promote.add_argument("--eval-tasks", type=int, default=d.eval_tasks, help="held-out tasks the canary measures on")
    promote.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per task and version")
    promote.add_argument("--eval-temperature", type=float, default=d.eval_temperature)
    promote.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    promote.add_argument("--concurrency", type=int, default=d.concurrency)
    rollback = sub.add_parser("rollback", help="serve the previous version again on every replica")
    rollback.set_defaults(version="", canary=None)
    for command in (promote, rollback):
        command.add_argument("--channel", choices=CHANNELS, default="generation")
        command.add_argument("--deadline", type=float, default=600.0,
                             help="seconds to wait for every replica before saying which did not follow")
        command.set_defaults(func=cmd_promote)


def _serve_metrics() -> None:
    """/metrics on ILF_METRICS_PORT when it is set (the retraining policy's rounds, as the services' calls)."""
    from ilf.metrics import serve_http
    port = config.get("ILF_METRICS_PORT")
    if port is not None:
        serve_http(port, config.get("ILF_BIND_HOST"))


def _with_retrain_args(argv: list[str]) -> list[str]:
    """`ilf retrain` reads ILF_RETRAIN_ARGS first (where compose and Kubernetes set its flags); flags on the
    command line come later, so they win."""
    import shlex
    if argv[:1] != ["retrain"]:
        return argv
    return ["retrain", *shlex.split(config.get("ILF_RETRAIN_ARGS")), *argv[1:]]


def cmd_tasksets(args) -> int:
    from loop.clients import Clients
    from ilf.v1 import feedback_pb2
    feedback = Clients.connect().feedback
    if args.action == "import":
        if not args.file:
            raise UsageError("ilf tasksets import needs a FILE (JSONL, one task per line; README \"Task sets\")")
        info = feedback.ImportTaskSet(feedback_pb2.ImportTaskSetRequest(
            jsonl=Path(args.file).read_bytes(), label=args.label or Path(args.file).stem), timeout=1800)
        print(f"{'imported' if info.imported else 'already stored'}: {info.name} ({info.label}): "
              + ", ".join(f"{split} {n}" for split, n in sorted(info.tasks_per_split.items())))
    elif args.action == "list":
        for info in feedback.ListTaskSets(feedback_pb2.ListTaskSetsRequest(), timeout=60).task_sets:
            print(f"{info.name:22s} {info.label:30s} "
                  + ", ".join(f"{split} {n}" for split, n in sorted(info.tasks_per_split.items())))
    else:
        if not args.file:
            raise UsageError("ilf tasksets show needs a NAME (see `ilf tasksets list`)")
        info = feedback.GetTaskSet(feedback_pb2.GetTaskSetRequest(name=args.file, include_tasks=True), timeout=60)
        for task in info.tasks:
            print(json.dumps({"task_id": task.task_id, "text": task.text, "tests": list(task.tests),
                              "code_prefix": task.code_prefix, "test_setup_code": task.test_setup_code}))
    return 0


def cmd_collect(args) -> int:
    """Samples the serving model on the task set's train split and queues its failing programs."""
    from loop.clients import Clients
    from loop.round import collect_failures
    done = collect_failures(Clients.connect(), _round_settings(args), args.model_version)
    print(f"{done.model_version}: {done.samples} samples of {done.tasks} tasks, {done.failing} failing; "
          f"{done.queued} new queue items, {done.duplicates} already queued")
    return 0


def _show_item(item) -> None:
    from ilf.v1 import execution_pb2, feedback_pb2
    print(f"item {item.item_id} ({feedback_pb2.QueueState.Name(item.state).removeprefix('QUEUE_STATE_').lower()}) "
          f"task {item.task_set}/{item.task_id}, written by {item.model_version}"
          + (f"; lease {item.lease_id} until {item.lease_expires_at.ToJsonString()}"
             if item.lease_id else ""))
    print(f"\nTASK: {item.task_text}\n\nPROGRAM:\n{item.program}\n")
    if item.load_error:
        print(f"the program did not load: {item.load_error}")
    for test in item.tests:
        result = test.result
        verdict = execution_pb2.Verdict.Name(result.verdict).removeprefix("VERDICT_")
        shown = f" (got {result.actual}, expected {result.expected})" if result.actual else ""
        detail = ": ".join(p for p in (result.error_type, result.error_message) if p)
        print(f"  {verdict:7s} {test.test}  {detail}{shown}")


def cmd_queue(args) -> int:
    """The annotation queue from a terminal: list, lease, skip, answer, or let the model answer."""
    from loop.clients import Clients
    from ilf.v1 import common_pb2, feedback_pb2
    feedback = Clients.connect().feedback
    if args.action == "list":
        state = feedback_pb2.QueueState.Value(f"QUEUE_STATE_{args.state.upper()}") if args.state else 0
        for item in feedback.ListQueue(feedback_pb2.ListQueueRequest(
                task_set=args.task_set, state=state, limit=args.limit), timeout=60).items:
            print(f"{item.item_id} {feedback_pb2.QueueState.Name(item.state).removeprefix('QUEUE_STATE_').lower():8s} "
                  f"{item.task_set}/{item.task_id} by {item.model_version}"
                  + (f" leased by {item.leased_by}" if item.leased_by else "")
                  + (f" answered ({item.answered_by}, record {item.record_id})" if item.record_id else ""))
    elif args.action == "lease":
        _show_item(feedback.LeaseItem(feedback_pb2.LeaseItemRequest(
            annotator_id=args.annotator, task_set=args.task_set, item_id=args.item,
            lease_seconds=args.lease_seconds), timeout=60))
    elif args.action == "skip":
        feedback.SkipItem(feedback_pb2.SkipItemRequest(item_id=args.item, lease_id=args.lease, reason=args.reason),
                          timeout=60)
        print(f"skipped {args.item}")
    elif args.action == "answer":
        refinement = Path(args.refinement_file).read_text() if args.refinement_file else ""
        record = feedback.AnswerItem(feedback_pb2.AnswerItemRequest(
            item_id=args.item, lease_id=args.lease, annotator_id=args.annotator, feedback=args.feedback,
            human_refinement=refinement), timeout=600)
        print(f"stored feedback record {record.record_id} ({record.tests.failure})")
    else:
        reply = feedback.AnswerWithModel(feedback_pb2.AnswerWithModelRequest(
            task_set=args.task_set, max_items=args.limit, older_than_s=args.older_than,
            shots=args.shots, params=common_pb2.SamplingParams(temperature=args.temperature, max_new_tokens=128,
                                                               seed=args.seed)), timeout=3600)
        print(f"{len(reply.records)} items answered by the model, {reply.silent} left queued (it wrote nothing)")
    return 0


def cmd_history(args) -> int:
    """Every round: versions, feedback used, pass@1 before and after with intervals, promoted or not; and a plot."""
    from ilf.store import open_store
    from loop.history import markdown, plot, rounds
    rows = rounds(open_store())
    if not rows:
        print("no rounds yet: `ilf round`, `ilf demo` and `ilf retrain` run them")
        return 0
    print(markdown(rows))
    Path(args.plot).write_bytes(plot(rows))
    print(f"plot of pass@1 over rounds: {Path(args.plot).resolve()}")
    return 0


def _add_loop_parsers(sub) -> None:
    """Task sets, the annotation queue and the history of rounds."""
    # The demo starts from a fresh store, where no one has written feedback on the serving model yet.
    sub.choices["demo"].set_defaults(feedback="paper")
    tasks = sub.add_parser("tasksets", help="import a JSONL task set (validated), list them, show one")
    tasks.add_argument("action", choices=("import", "list", "show"))
    tasks.add_argument("file", nargs="?", help="import: the JSONL file; show: the task set's name")
    tasks.add_argument("--label", default="", help="a name for people (default: the file's name)")
    tasks.set_defaults(func=cmd_tasksets)
    collect = sub.add_parser("collect", help="sample the serving model on a task set's train split and queue "
                                             "its failing programs for feedback")
    _add_round_flags(collect)
    collect.add_argument("--model-version", default="", help="sample this loaded version instead of the serving one")
    collect.set_defaults(func=cmd_collect)
    queue = sub.add_parser("queue", help="the annotation queue: list, lease an item, skip it, answer it, or let the "
                                         "model answer the items no one took")
    queue.add_argument("action", choices=("list", "lease", "skip", "answer", "model"))
    queue.add_argument("item", nargs="?", default="", help="skip, answer (and optionally lease): the item id")
    queue.add_argument("--task-set", default="", help="only this task set")
    queue.add_argument("--state", choices=("queued", "leased", "answered"), default="")
    queue.add_argument("--limit", type=int, default=0, help="list, model: at most this many items (0: all)")
    queue.add_argument("--annotator", default="", help="lease, answer: who you are")
    queue.add_argument("--lease", default="", help="skip, answer: the lease id `ilf queue lease` printed")
    queue.add_argument("--lease-seconds", type=float, default=600.0)
    queue.add_argument("--reason", default="", help="skip: why")
    queue.add_argument("--feedback", default="", help="answer: what is wrong and how to fix it")
    queue.add_argument("--refinement-file", default="", help="answer: a file with a repaired program that passes")
    queue.add_argument("--older-than", type=float, default=0.0, help="model: only items queued this many seconds")
    queue.add_argument("--shots", type=int, default=2, help="model: paper annotations shown as examples")
    queue.add_argument("--temperature", type=float, default=0.0, help="model: sampling temperature")
    queue.add_argument("--seed", type=int, default=1234)
    queue.set_defaults(func=cmd_queue)
    history = sub.add_parser("history", help="every round with pass@1 before and after, and a plot of it")
    history.add_argument("--plot", default="ilf-history.png", help="where to write the plot (PNG)")
    history.set_defaults(func=cmd_history)


def _add_experiment_parsers(sub) -> None:
    """The comparison, pi_Refine's sweep and the feedback ablation: the paper's sampling budget by default."""
    from loop.reproduce import DEFAULTS, METHODS, ROUNDS
    reproduce = sub.add_parser("reproduce", help="the paper's comparison of methods on one base model, rejection "
                                                 "sampling, and further ILF rounds on the model's own failures")
    _add_round_flags(reproduce)
    # The paper's budget with 10 evaluation samples per task (hours on a CPU: see loop.reproduce.DEFAULTS).
    reproduce.set_defaults(**DEFAULTS)
    reproduce.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    reproduce.add_argument("--rounds", type=int, default=ROUNDS,
                           help="ilf-rounds: ILF rounds after the first, with model-written feedback on the model's "
                                "own failures through the annotation queue")
    reproduce.add_argument("--resume", default="", metavar="REPORT_ID",
                           help="go on with an earlier run (same settings): keep its finished methods, read back "
                                "refinements and samples it stored before judging them, run the rest")
    reproduce.set_defaults(func=cmd_reproduce)
    sweep = sub.add_parser("refiner-sweep", help="fine-tune pi_Refine once per setting and score each on the "
                                                 "annotated MBPP_Train tasks (never MBPP_Test)")
    _add_round_flags(sweep)
    sweep.set_defaults(train_tasks=0, refine_samples=30, refine_temperature=0.8, func=cmd_refiner_sweep)
    sweep.add_argument("--sweep-epochs", type=int, nargs="+", default=[2, 6])
    sweep.add_argument("--sweep-batch-sizes", type=int, nargs="+", default=[8])
    sweep.add_argument("--sweep-learning-rates", type=float, nargs="+", default=[2e-4, 1e-3])
    sweep.add_argument("--sweep-lora-ranks", type=int, nargs="+", default=[16])
    sweep.add_argument("--no-base", dest="base", action="store_false",
                       help="do not score the untrained base model as a refiner first")
    ablation = sub.add_parser("feedback-ablation", help="1-shot refinement without fine-tuning with the right vs "
                                                        "shuffled feedback on the annotated MBPP_Train tasks")
    _add_round_flags(ablation)
    ablation.set_defaults(train_tasks=0, refine_samples=30, refine_temperature=0.8, func=cmd_feedback_ablation)
    for command in (reproduce, sweep, ablation):
        command.add_argument("--local", action="store_true", help="start the services here for the run")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="ilf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ilf {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=SERVICE_NAMES)
    serve.set_defaults(func=cmd_serve)
    for name, func, help_text in (("round", cmd_round, "run one ILF round against running services"),
                                  ("demo", cmd_demo, "start the services locally and run one round")):
        p = sub.add_parser(name, help=help_text)
        _add_round_flags(p)
        p.set_defaults(func=func)
    _add_experiment_parsers(sub)
    retrain = sub.add_parser("retrain", help="run a round whenever enough new human feedback has arrived")
    _add_round_flags(retrain)
    retrain.add_argument("--min-new-feedback", type=int, default=20)
    retrain.add_argument("--poll-seconds", type=float, default=60.0)
    retrain.add_argument("--max-rounds", type=int, default=1_000_000)
    retrain.add_argument("--max-wait-seconds", type=float, default=None, help="stop after this long without a round")
    retrain.add_argument("--retry-seconds", type=float, default=600.0, help="wait this long before retrying a failed round")
    retrain.set_defaults(func=cmd_retrain)
    _add_loop_parsers(sub)
    sub.add_parser("up", help="start the services locally until Ctrl-C").set_defaults(func=cmd_up)
    models = sub.add_parser("models", help="the model registry; status: what every replica serves")
    models.add_argument("action", choices=("list", "show", "history", "status"))
    models.add_argument("version", nargs="?")
    models.add_argument("--channel", default="generation")
    models.set_defaults(func=cmd_models)
    _add_promote_parsers(sub)
    settings = sub.add_parser("config", help="every setting with the value in effect and where it came from")
    settings.add_argument("--defaults", action="store_true", help="the reference: kinds, defaults and meanings")
    settings.set_defaults(func=cmd_config)
    sub.add_parser("reports", help="every report in the store, as absolute URLs").set_defaults(func=cmd_reports)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    args = parser.parse_args(_with_retrain_args(sys.argv[1:] if argv is None else argv))
    # SIGTERM unwinds like Ctrl-C does, so services started by `up`, `demo` or `reproduce --local` stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import grpc

    from ilf.config import ConfigError
    from ilf.errors import IlfError
    from loop.evaluation import RoundFailed
    try:
        return args.func(args) or 0
    except (UsageError, ConfigError, IlfError, RoundFailed, grpc.RpcError, OSError, TimeoutError, ValueError,
            RuntimeError) as error:
        print(f"ilf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, ConfigError)) else 1


if __name__ == "__main__":
    sys.exit(main())
