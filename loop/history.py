"""Every round so far, from the reports in the store and the retraining policy's attempts: a table and a plot."""
from __future__ import annotations

import time

from ilf.store import ArtifactStore
from loop.report import pass_cells, rounds_chart
from loop.retrain import attempts


def rounds(store: ArtifactStore) -> list[dict]:
    """One row per round, oldest first: finished rounds from their reports, and the policy's failed attempts."""
    rows = []
    for key in store.list("reports/round-"):
        if key.endswith("/report.json"):
            report = store.get_json(key)
            promotion = report.get("promotion") or {}
            rows.append({
                "round_id": report["round_id"], "started_at": report.get("started_at", 0.0),
                "task_set": report.get("task_set", "mbpp"), "before": report["before"],
                **({"after": report["after"]} if "after" in report else {}),
                "candidate": report.get("run", {}).get("model_version", ""),
                "feedback": report.get("feedback", {}), "records": report.get("dataset", {}).get("records", 0),
                "promoted": promotion.get("promoted", report["outcome"].startswith("switched")),
                "why": promotion.get("reason", report["outcome"]), "wall_seconds": report.get("wall_seconds")})
    finished = {row["round_id"] for row in rows}
    for attempt in attempts(store):
        if attempt.get("status") == "failed" and attempt["round_id"] not in finished:
            rows.append({"round_id": attempt["round_id"], "started_at": attempt["started_at"], "failed": attempt["error"]})
    return sorted(rows, key=lambda row: (row["started_at"], row["round_id"]))


def _feedback_cell(feedback: dict) -> str:
    if not feedback:
        return ""
    versions = ", ".join(f"`{v}` {n}" for v, n in feedback["by_model_version"].items())
    authors = ", ".join(f"{k} {n}" for k, n in feedback["by_author_kind"].items())
    return f"{feedback['records']} ({feedback['policy']}; {authors}; programs of {versions})" if versions else "0"


def markdown(rows: list[dict]) -> str:
    lines = ["| # | round | started (UTC) | task set | serving → candidate | feedback used | training records | "
             "pass@1 before [95% CI] | pass@1 after [95% CI] | promoted |", "|---" * 10 + "|"]
    for number, row in enumerate(rows, 1):
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["started_at"])) if row["started_at"] else ""
        if "failed" in row:
            lines.append(f"| {number} | {row['round_id']} | {started} | | | | | | | failed: {row['failed']} |")
            continue
        after = pass_cells(row["after"], ["1"])[0] if "after" in row else ""
        versions = f"`{row['before']['model_version']}` → `{row['candidate']}`" if row["candidate"] \
            else f"`{row['before']['model_version']}`"
        lines.append(f"| {number} | {row['round_id']} | {started} | {row['task_set']} | {versions} | "
                     f"{_feedback_cell(row['feedback'])} | {row['records']} | {pass_cells(row['before'], ['1'])[0]} | "
                     f"{after} | {'yes' if row['promoted'] else 'no'}: {row['why']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> bytes:
    return rounds_chart([row for row in rows if "before" in row], "pass@1 over ILF rounds")
