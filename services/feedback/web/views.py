"""What each page shows, as plain data read from the feedback service's core; the templates only lay it out."""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from ilf.errors import InvalidArgument, NotFound
from ilf.store import ArtifactStore
from services.feedback.queue import LEASED, QUEUED, Item, State
from services.feedback.records import Filter
from services.feedback.service import FeedbackService

# How the page names an item's state: a queued item someone gave back is "skipped" (it stays offered to others).
PAGE_STATES = ("open", "leased", "answered", "skipped")
POLICY_KEY = "policy/retraining.json"     # the retraining policy's pointer (loop/retrain.py writes it)
REPORTS_PREFIX = "reports/round-"        # reports/<round id>/report.json, written last by every round

_LEXER = PythonLexer()
_BLOCK = HtmlFormatter(linenos="table", cssclass="code", wrapcode=True)
_INLINE = HtmlFormatter(nowrap=True)
HIGHLIGHT_CSS = HtmlFormatter(style="default").get_style_defs([".code", ".inline-code"])


def highlighted(program: str) -> Markup:
    """The program as syntax-highlighted HTML with line numbers (Pygments escapes the text)."""
    return Markup(highlight(program, _LEXER, _BLOCK))


def highlighted_inline(code: str) -> Markup:
    return Markup(highlight(code, _LEXER, _INLINE).rstrip("\n"))


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if seconds else ""


def ago(seconds: float, now: float | None = None) -> str:
    """How long ago (or, negative, how long until) a moment is, roughly: "3 min ago", "in 40 s"."""
    delta = (time.time() if now is None else now) - seconds
    amount = abs(delta)
    text = (f"{amount:.0f} s" if amount < 90 else f"{amount / 60:.0f} min" if amount < 5400
            else f"{amount / 3600:.0f} h" if amount < 129600 else f"{amount / 86400:.0f} days")
    return f"{text} ago" if delta >= 0 else f"in {text}"


def page_state(state: State) -> str:
    if state.state == QUEUED:
        return "skipped" if state.skipped_by else "open"
    return state.state


@dataclass(frozen=True)
class QueueSelection:
    """The queue page's filters; empty: any."""
    task_set: str = ""
    split: str = ""
    state: str = ""
    model_version: str = ""

    def __post_init__(self):
        if self.state and self.state not in PAGE_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(PAGE_STATES)}, got {self.state!r}")

    def matches(self, row: "QueueRow") -> bool:
        return ((not self.task_set or row.item.task_set == self.task_set) and (not self.split or row.split == self.split)
                and (not self.state or row.state == self.state)
                and (not self.model_version or row.item.model_version == self.model_version))


@dataclass(frozen=True)
class QueueRow:
    item: Item
    raw: State
    state: str                # one of PAGE_STATES
    split: str
    task_set_label: str
    tests_passed: int

    @property
    def tests_total(self) -> int:
        return len(self.item.tests)


@dataclass
class QueueView:
    rows: list[QueueRow]                                 # the selected items, oldest first
    counts: dict[tuple[str, str], Counter]               # (task set label, split) -> page state -> items, all items
    task_sets: dict[str, str]                            # name -> label, of the task sets with items
    splits: list[str]
    model_versions: list[str]
    total: int = 0
    totals: Counter = field(default_factory=Counter)


def queue_view(service: FeedbackService, selection: QueueSelection = QueueSelection()) -> QueueView:
    rows = []
    for item, state in service.queue.list():
        task_set = service.task_sets.get(item.task_set)
        rows.append(QueueRow(item, state, page_state(state), task_set.split_of(item.task_id), task_set.label,
                             sum(t["verdict"] == "PASSED" for t in item.tests)))
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in rows:
        counts[(row.task_set_label, row.split)][row.state] += 1
    return QueueView(rows=[r for r in rows if selection.matches(r)], counts=dict(sorted(counts.items())),
                     task_sets={r.item.task_set: r.task_set_label for r in rows},
                     splits=sorted({r.split for r in rows}),
                     model_versions=sorted({r.item.model_version for r in rows}),
                     total=len(rows), totals=Counter(r.state for r in rows))


@dataclass
class ItemView:
    item: Item
    state: State
    page_state: str
    task_text: str
    split: str
    task_set_label: str
    held_by_viewer: bool       # the viewer holds the lease: the page offers submit and skip


def item_view(service: FeedbackService, item: Item, state: State, viewer: str) -> ItemView:
    task_set = service.task_sets.get(item.task_set)
    task = task_set.task(item.task_id)
    return ItemView(item, state, page_state(state), task.text, task.split, task_set.label,
                    held_by_viewer=state.state == LEASED and state.leased_by == viewer)


# ---------------------------------------------------------------- progress

@dataclass
class RoundPoint:
    round_id: str
    started_at: float
    before: tuple[float, float, float] | None    # pass@1, interval low, high
    after: tuple[float, float, float] | None
    promoted: bool
    why: str


@dataclass
class ProgressView:
    per_annotator: list[tuple[str, int, int, float]]    # name, records, with a refinement, latest (unix s)
    per_day: list[tuple[str, int, dict[str, int]]]      # UTC date, records, by annotator
    model_written: int
    imported: int                                       # the paper's annotations, not counted above
    since: float                                        # the last round the retraining policy started; 0: none
    new_for_policy: int                                 # human train-split records since then
    policy_threshold: int | None                        # what the policy waits for, when it says
    rounds: list[RoundPoint]
    chart: dict | None


def _pass_at_1(evaluation: dict | None) -> tuple[float, float, float] | None:
    if not evaluation or "1" not in evaluation.get("pass_at", {}):
        return None
    low, high = evaluation.get("interval95", {}).get("1", [evaluation["pass_at"]["1"]] * 2)
    return evaluation["pass_at"]["1"], low, high


def rounds_of(store: ArtifactStore) -> list[RoundPoint]:
    """Every finished round's pass@1 before and after, from the reports in the store, oldest first."""
    points = []
    for key in store.list(REPORTS_PREFIX):
        if not key.endswith("/report.json"):
            continue
        report = store.get_json(key)
        promotion = report.get("promotion", {})
        points.append(RoundPoint(report.get("round_id", key.split("/")[1]), report.get("started_at", 0.0),
                                 _pass_at_1(report.get("before")), _pass_at_1(report.get("after")),
                                 bool(promotion.get("promoted")), promotion.get("reason", report.get("outcome", ""))))
    return sorted(points, key=lambda p: (p.started_at, p.round_id))


# The chart's drawing area in SVG units (the page scales it to its width).
CHART_W, CHART_H, CHART_LEFT, CHART_TOP, CHART_BOTTOM = 640, 240, 48, 16, 40


def chart_of(points: list[RoundPoint]) -> dict | None:
    """Coordinates of the pass@1-over-rounds chart: a dot with its 95% interval per evaluation, before (grey) and
    after (blue, filled when promoted); None without a round."""
    if not points:
        return None
    values = [v for p in points for e in (p.before, p.after) if e for v in e]
    top = max(0.05, max(values, default=0.0)) * 1.1
    plot_h = CHART_H - CHART_TOP - CHART_BOTTOM
    step = (CHART_W - CHART_LEFT - 16) / len(points)

    def y(value: float) -> float:
        return round(CHART_TOP + plot_h * (1 - value / top), 1)
    marks = []
    for number, point in enumerate(points):
        middle = CHART_LEFT + step * (number + 0.5)
        for kind, evaluation, offset in (("before", point.before, -8), ("after", point.after, 8)):
            if evaluation:
                value, low, high = evaluation
                marks.append({"kind": kind, "x": round(middle + offset, 1), "y": y(value), "low": y(low),
                              "high": y(high), "value": value, "filled": kind == "before" or point.promoted,
                              "label": f"{point.round_id} {kind}: pass@1 {value:.3f} [{low:.3f}, {high:.3f}]"})
    ticks = [{"y": y(top * i / 4), "label": f"{top * i / 4:.2f}"} for i in range(5)]
    labels = [{"x": round(CHART_LEFT + step * (i + 0.5), 1), "text": str(i + 1)} for i in range(len(points))]
    return {"width": CHART_W, "height": CHART_H, "left": CHART_LEFT, "bottom": CHART_H - CHART_BOTTOM,
            "top": CHART_TOP, "marks": marks, "ticks": ticks, "labels": labels}


def progress_view(service: FeedbackService) -> ProgressView:
    records = service.records.list()
    people = [r for r in records if r.author_kind == "human" and r.source != "paper"]
    per_annotator: dict[str, list] = {}
    per_day: dict[str, Counter] = defaultdict(Counter)
    for record in people:
        row = per_annotator.setdefault(record.annotator_id, [record.annotator_id, 0, 0, 0.0])
        row[1] += 1
        row[2] += bool(record.human_refinement)
        row[3] = max(row[3], record.created_at)
        per_day[time.strftime("%Y-%m-%d", time.gmtime(record.created_at))][record.annotator_id] += 1
    try:
        policy = service.records.store.get_json(POLICY_KEY)
    except NotFound:
        policy = {}
    since = float(policy.get("last_round_started_at", 0.0))
    new = service.records.list(Filter(split="train", author_kind="human", since=since,
                                      task_set=policy.get("task_set", "")))
    threshold = policy.get("min_new_feedback")
    points = rounds_of(service.records.store)
    return ProgressView(
        per_annotator=sorted((tuple(r) for r in per_annotator.values()), key=lambda r: (-r[1], r[0])),
        per_day=[(day, sum(c.values()), dict(c)) for day, c in sorted(per_day.items(), reverse=True)],
        model_written=sum(r.author_kind == "model" for r in records),
        imported=sum(r.source == "paper" for r in records), since=since, new_for_policy=len(new),
        policy_threshold=int(threshold) if threshold is not None else None, rounds=points, chart=chart_of(points))
