import hashlib
from math import comb

import pytest

from ilf import data, passk


def test_pass_at_k_hand_computed():
    assert passk.pass_at_k(10, 0, 1) == 0.0
    assert passk.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert passk.pass_at_k(10, 3, 2) == pytest.approx(24 / 45)
    assert passk.pass_at_k(30, 1, 10) == pytest.approx(1 - comb(29, 10) / comb(30, 10))
    assert passk.pass_at_k(5, 4, 2) == 1.0  # fewer than k failures: every k-subset holds a pass


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError):
        passk.pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        passk.pass_at_k(5, 1, 6)


def test_mean_and_bootstrap():
    results = {1: (4, 0), 2: (4, 4), 3: (4, 2), 4: (4, 1)}
    assert passk.mean_pass_at_k(results, 1) == pytest.approx((0 + 1 + 0.5 + 0.25) / 4)
    low, high = passk.bootstrap_interval(results, 1)
    assert 0 <= low < passk.mean_pass_at_k(results, 1) < high <= 1
    assert passk.bootstrap_interval({1: (4, 2)}, 1) == (0.5, 0.5)


def test_a_paired_difference_keeps_the_pairing_of_tasks():
    # b solves one more sample than a on every task: the difference is -0.1 on every resample, an interval of zero
    # width, where two unpaired intervals of such spread-out tasks would overlap widely
    a = {t: (10, t % 10) for t in range(50)}
    b = {t: (10, t % 10 + 1) for t in range(50)}
    assert passk.paired_difference(a, b, 1) == pytest.approx((-0.1, -0.1, -0.1))
    assert passk.paired_difference(a, a, 1) == (0.0, 0.0, 0.0)
    mixed = {t: (10, t % 10 + (1 if t % 2 else -1) * (0 < t % 10 < 9)) for t in range(50)}
    difference, low, high = passk.paired_difference(mixed, a, 1)
    assert low < difference < high and abs(difference) < 0.02


def test_splits_follow_the_paper():
    assert [len(data.split_tasks(s)) for s in ("prompt", "test", "refine", "train")] == [10, 100, 200, 664]
    assert data.split_of(11) == "test" and data.split_of(110) == "test" and data.split_of(311) == "train"
    assert [len(data.annotations(s)) for s in ("prompt", "test", "refine", "train")] == [2, 21, 44, 128]


def test_dev_split_shares_no_task_with_test_or_any_training_set():
    dev = {t.task_id for t in data.evaluation_tasks("dev")}
    assert len(dev) == 664 - 128 and dev <= set(data.SPLITS["train"])
    assert not dev & {a.task_id for a in data.annotations()}
    assert [t.task_id for t in data.evaluation_tasks("test")] == list(range(11, 111))
    with pytest.raises(ValueError, match="evaluation split"):
        data.evaluation_tasks("validation")


def test_data_files_have_the_published_checksums():
    for name, (_, sha) in data.SOURCES.items():
        assert data.sha256_of(data.data_file(name)) == sha


def test_download_is_verified(tmp_path, monkeypatch):
    """Without ILF_DATA_DIR the file is fetched (here from a local URL) and its sha256 checked."""
    monkeypatch.setenv("ILF_DATA_DIR", "")
    monkeypatch.setenv("ILF_CACHE", str(tmp_path))
    good = tmp_path / "src.jsonl"
    good.write_bytes(b'{"task_id": 1}\n')
    monkeypatch.setitem(data.SOURCES, "mbpp.jsonl", (good.as_uri(), hashlib.sha256(good.read_bytes()).hexdigest()))
    assert data.data_file("mbpp.jsonl").read_bytes() == good.read_bytes()
    monkeypatch.setitem(data.SOURCES, "surge_annotations.jsonl", (good.as_uri(), "0" * 64))
    with pytest.raises(data.DataError, match="sha256"):
        data.data_file("surge_annotations.jsonl")
    assert not (tmp_path / "data" / "surge_annotations.jsonl").exists()
