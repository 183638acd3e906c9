"""MBPP and the ILF paper's feedback annotations, with the paper's task-id splits.

Files come from ILF_DATA_DIR, or are downloaded once from their public sources and
checked against a pinned sha256 (the project never ships them).
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ilf import config
from ilf.errors import FailedPrecondition

SOURCES = {
    "mbpp.jsonl": (
        "https://raw.githubusercontent.com/google-research/google-research/"
        "2251e8c67a7fe7d6348714967ee101080b28e956/mbpp/mbpp.jsonl",
        "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a",
    ),
    "surge_annotations.jsonl": (
        "https://raw.githubusercontent.com/nyu-mll/ILF-for-code-generation/main/surge_annotations.jsonl",
        "fedbfd3e2a0cfcb39497e93dae5ad996e734bbc51a9f6ecd1f49bc8cd595ecfc",
    ),
}

# The paper's splits by task id (not MBPP's official split).
SPLITS = {
    "prompt": range(1, 11),
    "test": range(11, 111),
    "refine": range(111, 311),
    "train": range(311, 975),
}


class DataError(FailedPrecondition):
    """The data files are missing, cannot be downloaded, or fail their checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_file(name: str) -> Path:
    """Path of a data file, from ILF_DATA_DIR or downloaded and verified."""
    url, expected = SOURCES[name]
    data_dir = config.get("ILF_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / name
        if not path.exists():
            raise DataError(f"{path} does not exist (ILF_DATA_DIR={data_dir})")
        return path
    path = Path(config.get("ILF_CACHE")) / "data" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as error:
            raise DataError(f"cannot download {name} from {url} ({error}); set ILF_DATA_DIR to a folder "
                            f"holding it") from None
        actual = sha256_of(partial)
        if actual != expected:
            partial.unlink()
            raise DataError(f"{name} from {url} has sha256 {actual}, expected {expected}")
        os.replace(partial, path)
    return path


@dataclass(frozen=True)
class MBPPTask:
    task_id: int
    text: str
    code: str
    tests: tuple[str, ...]
    test_setup_code: str = ""
    challenge_tests: tuple[str, ...] = field(default=())

    @property
    def split(self) -> str:
        return split_of(self.task_id)


@dataclass(frozen=True)
class Annotation:
    """One of the paper's human annotations: a failing program, feedback and a passing refinement."""
    task_id: int
    prompt: str
    failing_program: str
    feedback: str
    refinement_body: str
    refinement_program: str
    annotator: str


def split_of(task_id: int) -> str:
    for name, ids in SPLITS.items():
        if task_id in ids:
            return name
    raise KeyError(f"task {task_id} is in no split")


@lru_cache(maxsize=None)
def _load_mbpp(path: str) -> dict[int, MBPPTask]:
    tasks = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            tasks[row["task_id"]] = MBPPTask(
                task_id=row["task_id"], text=row["text"], code=row["code"],
                tests=tuple(row["test_list"]), test_setup_code=row.get("test_setup_code", ""),
                challenge_tests=tuple(row.get("challenge_test_list", [])),
            )
    return tasks


def mbpp() -> dict[int, MBPPTask]:
    """All 974 MBPP tasks by task id."""
    return _load_mbpp(str(data_file("mbpp.jsonl")))


def task(task_id: int) -> MBPPTask:
    tasks = mbpp()
    if task_id not in tasks:
        raise KeyError(f"MBPP has no task {task_id}")
    return tasks[task_id]


def split_tasks(split: str) -> list[MBPPTask]:
    ids = SPLITS[split]
    return [t for tid, t in sorted(mbpp().items()) if tid in ids]


# Where a model is evaluated: MBPP_Test for results; "dev" for choosing settings without looking at
# MBPP_Test: MBPP_Train tasks with no annotation, which no training set here draws from.
EVALUATION_SPLITS = {"test": "MBPP_Test", "dev": "MBPP_Train without annotations"}


def evaluation_tasks(split: str) -> list[MBPPTask]:
    if split == "dev":
        annotated = {a.task_id for a in annotations("train")}
        return [t for t in split_tasks("train") if t.task_id not in annotated]
    if split == "test":
        return split_tasks("test")
    raise ValueError(f"evaluation split must be one of {tuple(EVALUATION_SPLITS)}, got {split!r}")


@lru_cache(maxsize=None)
def _load_annotations(path: str) -> tuple[Annotation, ...]:
    rows = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows.append(Annotation(
                task_id=row["task_id"], prompt=row["prompt"],
                failing_program=row["original_model_completion"], feedback=row["Feedback"].strip(),
                refinement_body=row["completion"].replace("\r\n", "\n"),
                refinement_program=row["unedited_annotator_completion"].replace("\r\n", "\n"),
                annotator=str(row.get("worker_id") or "surge"),
            ))
    # By task id, as every split and task set is ordered: "the first N annotated tasks" must be the same tasks for
    # every method of a comparison (the file's own order is not by id: 311, 324, 326, ..., 315 at row 58).
    return tuple(sorted(rows, key=lambda a: a.task_id))


def annotations(split: str | None = None) -> list[Annotation]:
    """The paper's 195 annotations by task id, optionally only those of one split."""
    rows = _load_annotations(str(data_file("surge_annotations.jsonl")))
    return [a for a in rows if split is None or a.task_id in SPLITS[split]]
