"""The dependency direction of the layout: protos -> ilf (core) -> services, trainer, loop -> cli."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, statically or through importlib with a literal or f-string prefix."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args):
            argument = node.args[0]
            if isinstance(argument, ast.Constant):
                names.add(argument.value)
            elif isinstance(argument, ast.JoinedStr) and isinstance(argument.values[0], ast.Constant):
                names.add(argument.values[0].value)
    return names


def top(module: str) -> str:
    return module.split(".")[0]


def files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts)


FORBIDDEN = {"ilf": {"services", "trainer", "loop", "cli"}, "trainer": {"services", "loop", "cli"},
             "loop": {"services", "trainer", "cli"}, "services": {"trainer", "loop", "cli"},
             "benchmarks": {"tests", "conftest", "cli"}}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    wrong = {f"{path.relative_to(ROOT)} imports {module}" for path in files(package)
             for module in imported_modules(path) if top(module) in FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


def test_no_service_imports_another_service():
    wrong = set()
    for service in sorted(p for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()):
        for path in files(f"services/{service.name}"):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] not in (service.name, ""):
                    wrong.add(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, sorted(wrong)


def test_the_checker_sees_each_kind_of_import(tmp_path):
    """So the rules above cannot pass by failing to notice an import."""
    sample = tmp_path / "sample.py"
    sample.write_text("import services.generation\nfrom loop.round import run_round\nimport importlib\n"
                      "importlib.import_module(f'services.{name}.server')\n")
    assert {top(m) for m in imported_modules(sample)} == {"services", "loop", "importlib"}


def test_the_readme_layout_table_and_the_tree_agree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| path | what |"):readme.index("Services talk to each other")]
    listed = {path.strip("/") for path in re.findall(r"^\| `([\w./<>-]+)`", table, re.M)}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages <= listed | {"ilf"}, f"packages missing from the README's layout table: {packages - listed}"
    for path in listed - {"services/<name>"}:
        assert (ROOT / path).exists(), f"the README's layout table names {path}, which does not exist"
    services = {p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    row = next(line for line in table.splitlines() if line.startswith("| `services/<name>/`"))
    assert all(f"`{name}`" in row for name in services), row
