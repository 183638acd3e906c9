"""The command line as a newcomer meets it: one-line errors, --version, the settings in effect, empty listings."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def ilf(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_version():
    result = ilf("--version")
    assert result.returncode == 0 and result.stdout.startswith("ilf ") and result.stdout.split()[1][0].isdigit()


def test_errors_are_one_line_with_what_to_do_and_no_traceback(tmp_path):
    store = {"ILF_STORE": f"file://{tmp_path / 'store'}"}
    for args, env, status, words in [
        (("models", "show"), store, 2, "needs a VERSION"),
        (("models", "show", "nope"), store, 1, "nope"),
        (("promote", "v1"), store, 1, "'v1' is not registered"),
        (("collect",), {**store, "ILF_FEEDBACK_ADDR": f"127.0.0.1:{free_port()}"}, 1, "unreachable"),
        (("models", "list"), {"ILF_STORE": "ftp://nowhere"}, 1, "unknown store URL scheme"),
    ]:
        result = ilf(*args, **env)
        assert result.returncode == status, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)


def test_config_shows_the_values_in_effect_and_where_they_came_from():
    table = ilf("config", ILF_GENERATION_PORT="7051", ILF_EXECUTION_TIMEOUT_S="fast").stdout
    assert "| `ILF_GENERATION_PORT` | `7051` | environment | ok |" in table
    assert "| `ILF_FEEDBACK_PORT` | `50055` | default | ok |" in table
    assert "| `ILF_EXECUTION_TIMEOUT_S` | `fast` | environment | **invalid**: must be a float |" in table
    reference = ilf("config", "--defaults").stdout
    assert "| `ILF_GENERATION_PORT` | int |" in reference


def test_a_fresh_store_says_it_is_empty(tmp_path):
    store = {"ILF_STORE": f"file://{tmp_path / 'store'}"}
    assert "no model versions" in ilf("models", "list", **store).stdout
    assert "no reports" in ilf("reports", **store).stdout


def test_round_help_shows_defaults():
    shown = ilf("round", "--help").stdout
    assert re.search(r"tasks to evaluate[^-]*\(default: \d+\)", shown), shown
