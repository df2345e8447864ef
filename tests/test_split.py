"Subject-disjoint splits: no subject in two parts, ever."
import json

import pytest

from edanb.data import (DataError, PARTS, SplitError, check_split, kfold_subjects, load_split, save_split,
                        split_counts, split_subjects)

SUBJECTS = [f"s{i}" for i in range(1, 57)]


def assert_disjoint_cover(split, subjects):
    parts = [set(split[p]) for p in PARTS]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(subjects)
    assert set().union(*parts) == set(subjects)


@pytest.mark.parametrize("n", [3, 5, 12, 20, 56])
@pytest.mark.parametrize("seed", range(5))
def test_split_is_subject_disjoint(n, seed):
    split = split_subjects(SUBJECTS[:n], seed=seed)
    assert_disjoint_cover(split, SUBJECTS[:n])
    assert all(len(split[p]) >= 1 for p in PARTS)


def test_ubfc_proportions():
    assert split_counts(56) == (35, 10, 11)
    assert split_counts(12) == (8, 2, 2)
    with pytest.raises(SplitError, match="at least 3 subjects"):
        split_counts(2)
    with pytest.raises(SplitError, match="no training subject"):
        split_counts(3, (0, 1, 1))


def test_seed_changes_split_and_is_reproducible():
    assert split_subjects(SUBJECTS, seed=3) == split_subjects(SUBJECTS, seed=3)
    assert split_subjects(SUBJECTS, seed=3) != split_subjects(SUBJECTS, seed=4)


def test_kfold_tests_every_subject_once():
    folds = kfold_subjects(SUBJECTS[:12], k=4, seed=0)
    for fold in folds:
        assert_disjoint_cover(fold, SUBJECTS[:12])
    tested = [s for fold in folds for s in fold["test"]]
    assert sorted(tested) == sorted(SUBJECTS[:12])
    with pytest.raises(SplitError, match="3 <= k"):
        kfold_subjects(SUBJECTS[:12], k=2)


def test_save_and_load_round_trip(tmp_path):
    split = split_subjects(SUBJECTS[:12], seed=1)
    path = save_split(split, tmp_path / "runs" / "split.json", seed=1)
    assert load_split(path) == split
    assert json.loads(path.read_text())["seed"] == 1


def test_guard_rejects_overlap(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(dict(train=["s1", "s2"], val=["s3"], test=["s2"])))
    with pytest.raises(SplitError, match=f"{path}: subject s2 is in both train and test"):
        load_split(path)
    with pytest.raises(SplitError):
        save_split(dict(train=["s1"], val=["s1"], test=["s2"]), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_bad_split_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="split file is missing"):
        load_split(tmp_path / "none.json")
    bad = tmp_path / "bad.json"; bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: split file is not valid JSON"):
        load_split(bad)
    partial = tmp_path / "partial.json"; partial.write_text(json.dumps(dict(train=["s1"])))
    with pytest.raises(SplitError, match="missing part"):
        load_split(partial)


def test_check_split_sorts_numerically():
    assert check_split(dict(train=["s10", "s2"], val=["s1"], test=["s3"]))["train"] == ["s2", "s10"]
