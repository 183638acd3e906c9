"""The training service's Prometheus metrics, read from the RunManager when scraped (deploy/README.md, "Metrics")."""
from __future__ import annotations

from ilf.metrics import Sampled


def _running(progress_field: str):
    def read(manager) -> dict[tuple[str, ...], float]:
        return {(state["run_id"],): float(state["progress"][progress_field]) for state in list(manager.states.values())
                if state["state"] == "RUNNING" and isinstance(state.get("progress", {}).get(progress_field), (int, float))}
    return read


RUNS = (
    Sampled("ilf_training_runs", "Training runs this service knows, by state.",
            lambda m: {(state,): float(sum(s["state"] == state for s in list(m.states.values())))
                       for state in ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}, labels=("state",)),
    Sampled("ilf_training_step", "Optimizer step of each running run.", _running("step"), labels=("run_id",)),
    Sampled("ilf_training_total_steps", "Optimizer steps each running run will take.", _running("total_steps"),
            labels=("run_id",)),
    Sampled("ilf_training_loss", "Latest training loss of each running run.", _running("loss"), labels=("run_id",)),
    Sampled("ilf_training_tokens_per_second", "Training throughput of each running run.",
            _running("tokens_per_second"), labels=("run_id",)),
)
