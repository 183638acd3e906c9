"""One renderer for every results table and chart the loop writes (a round's before/after, the comparison)."""
from __future__ import annotations

import io
import json
from typing import Callable


def publish(store, prefix: str, report: dict, png: bytes) -> None:
    """A report's results.json, its results.md (report["markdown"]) and results.png under prefix, replacing
    earlier ones, so a run that writes after every step keeps what it finished if it is interrupted."""
    report["artifacts"] = prefix
    store.put(f"{prefix}/results.json", json.dumps(report, indent=2).encode(), overwrite=True)
    store.put(f"{prefix}/results.md", report["markdown"].encode(), overwrite=True)
    store.put(f"{prefix}/results.png", png, overwrite=True)


def summary(evaluation, *, solved_tasks: bool = False) -> dict:
    """An evaluation as stored in reports: pass@k with its bootstrap 95% interval (and the solved task ids)."""
    row = {"model_version": evaluation.model_version,
           "pass_at": {str(k): v for k, v in evaluation.pass_at.items()},
           "interval95": {str(k): list(v) for k, v in evaluation.intervals.items()}}
    if solved_tasks:
        row["solved_tasks"] = sorted(t for t, (_, c) in evaluation.results.items() if c)
    return row


def ks_of(rows: dict[str, dict]) -> list[str]:
    evaluated = [row for row in rows.values() if "pass_at" in row]
    return list(evaluated[0]["pass_at"]) if evaluated else ["1"]


def pass_cells(row: dict, ks: list[str]) -> list[str]:
    """`0.080 [0.03, 0.13]` per k, or the row's outcome where it was never evaluated."""
    if "pass_at" not in row:
        return [row.get("outcome", "")] * len(ks)
    return [f"{row['pass_at'][k]:.3f} [{row['interval95'][k][0]:.2f}, {row['interval95'][k][1]:.2f}]" for k in ks]


def markdown_table(first_header: str, rows: dict[str, dict], ks: list[str],
                   extra: dict[str, Callable[[dict], str]] | None = None) -> list[str]:
    """Markdown lines: one row per labelled result; `extra` adds columns computed from each row."""
    extra = extra or {}
    lines = [f"| {first_header} | " + " | ".join([f"pass@{k} [95% CI]" for k in ks] + list(extra)) + " |",
             "|---|" + "---|" * (len(ks) + len(extra))]
    for label, row in rows.items():
        cells = pass_cells(row, ks) + [column(row) for column in extra.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def chart(rows: dict[str, dict], title: str, ylabel: str) -> bytes:
    """A PNG: one group of bars per labelled result, one bar per k, with the 95% intervals as error bars."""
    plt = _pyplot()
    rows = {label: row for label, row in rows.items() if "pass_at" in row}
    ks = ks_of(rows) if rows else []
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5))
    width = 0.8 / max(len(ks), 1)
    for j, k in enumerate(ks):
        values = [r["pass_at"][k] for r in rows.values()]
        errors = [[v - r["interval95"][k][0] for v, r in zip(values, rows.values())],
                  [r["interval95"][k][1] - v for v, r in zip(values, rows.values())]]
        ax.bar([i + j * width for i in range(len(rows))], values, width, yerr=errors, capsize=3, label=f"pass@{k}")
    ax.set_xticks([i + width * (len(ks) - 1) / 2 for i in range(len(rows))],
                  [label.replace(" (", "\n(").replace(" on ", "\non ") for label in rows], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _png(plt, fig)


def rounds_chart(rounds: list[dict], title: str) -> bytes:
    """A PNG: pass@1 of the serving model (before) and of the candidate (after) per round, with 95% intervals
    as error bars; a filled marker where the candidate was promoted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rounds) + 2), 4.5))
    xs = list(range(1, len(rounds) + 1))
    for label, offset, color in (("before", -0.08, "tab:gray"), ("after", 0.08, "tab:blue")):
        points = [(x + offset, r[label]) for x, r in zip(xs, rounds) if label in r]
        if not points:
            continue
        values = [p["pass_at"]["1"] for _, p in points]
        errors = [[v - p["interval95"]["1"][0] for v, (_, p) in zip(values, points)],
                  [p["interval95"]["1"][1] - v for v, (_, p) in zip(values, points)]]
        ax.errorbar([x for x, _ in points], values, yerr=errors, fmt="o", capsize=3, color=color,
                    label="serving model (before)" if label == "before" else "candidate (after)",
                    markerfacecolor=color if label == "before" else "white")
    promoted = [(x + 0.08, r["after"]["pass_at"]["1"]) for x, r in zip(xs, rounds) if r.get("promoted")]
    if promoted:
        ax.plot(*zip(*promoted), "o", color="tab:blue", label="candidate promoted", zorder=3)
    highest = max([r[label]["interval95"]["1"][1] for r in rounds for label in ("before", "after") if label in r] or [0])
    ax.set_ylim(-0.02, min(1.02, max(0.1, highest * 1.15)))  # pass@1 is a share: never below 0
    ax.set_xlim(0.5, len(rounds) + 0.5)
    ax.set_xticks(xs, [f"{i}\n{r['round_id'][-11:]}" for i, r in zip(xs, rounds)], fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("pass@1 (95% interval)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(plt, fig)
