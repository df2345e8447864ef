"UBFC-Phys on its own terms: subject metadata, the test and ctrl groups, gaps in the dataset, exclusion lists."
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edanb.data import (DataError, MetadataWarning, metadata_paths, read_anxiety_file, read_exclusions, read_info_file,
                        recording_paths, subject_metadata)
from edanb.components import SCR_MIN_US
from edanb.stress import balanced_accuracy, level_free_features, rest_vs_stress
from edanb.synth import SynthConfig, generate, make_subject, recording_world, subject_group


def edanb(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("edanb")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    "Six subjects of the rich world, 8 s, 64 px: three in each group."
    root = tmp_path_factory.mktemp("grouped") / "ubfc"
    generate(root, SynthConfig(subjects=6, seconds=8, size=64), workers=2, progress=False)
    return root


@pytest.fixture
def copy(grouped, tmp_path) -> Path:
    return Path(shutil.copytree(grouped, tmp_path / "ubfc"))


# --- the metadata files, in UBFC-Phys's formats ---

def test_the_readers_take_ubfc_phys_exact_formats(tmp_path):
    info, anxiety = tmp_path / "info_s7.txt", tmp_path / "selfReportedAnx_s7.csv"
    info.write_text("s7\nm\nctrl\n2019_02_26\n10:49:30\n")
    anxiety.write_text("12,15\n10,14\n25,21\n")
    assert read_info_file(info) == dict(gender="m", group="ctrl", date="2019_02_26", start="10:49:30")
    assert read_anxiety_file(anxiety) == dict(cognitive_before=12, cognitive_after=15, somatic_before=10, somatic_after=14,
                                              confidence_before=25, confidence_after=21)
    anxiety.write_text("before,after\n12,15\n10,14\n25,21\n")     # a header line is read past
    assert read_anxiety_file(anxiety)["confidence_after"] == 21


@pytest.mark.parametrize("kind,text,words", [
    ("info", "s7\n", "has 1 line(s); expected 5"),
    ("info", "s7\nx\ntest\n", "line 2: gender 'x' is not one of"),
    ("info", b"\xff\xfe\x00garbage", "is not a text file"),
    ("anxiety", "12,15\n10\n25,21\n", "expected 3 rows of 2 numbers"),
    ("anxiety", "a,b\nc,d\ne,f\n", "expected 3 rows of 2 numbers"),
])
def test_a_malformed_metadata_file_is_one_warning_naming_it_and_the_subject_stays(copy, kind, text, words):
    path = metadata_paths(copy, "s2")[kind]
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(DataError, match=re.escape(words)): (read_info_file if kind == "info" else read_anxiety_file)(path)
    result = edanb("info", copy)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"edanb: warning: {path}: ") and words.split("'")[0] in warned[0], warned
    assert "18 recording(s) ok, 0 gap(s), 0 problem(s)" in result.stdout


def test_info_shows_each_subjects_gender_group_and_anxiety(grouped):
    result = edanb("info", grouped)
    assert result.returncode == 0 and result.stderr.count("warning") == 0, result.stderr
    for n in range(1, 7):
        meta = subject_metadata(grouped, f"s{n}")
        line = next(l for l in result.stdout.splitlines() if l.split()[:1] == [f"s{n}"])
        assert meta["group"] in line and f"{meta['cognitive_after']:g}" in line.replace(".0 ", " ")


def test_a_missing_metadata_file_is_one_line_and_nothing_fails(copy):
    path = metadata_paths(copy, "s3")["anxiety"]; path.unlink()   # as selfReportedAnx_s56.csv in the real dataset
    result = edanb("info", copy)
    assert result.returncode == 0 and result.stderr.strip() == f"edanb: warning: {path}: file is missing"


# --- a dataset with a gap, as UBFC-Phys's s40 ---

def test_a_dataset_without_one_video_is_read_preprocessed_and_trained_on(copy, tmp_path):
    gap = recording_paths(copy, "s4", "T3")["video"]; gap.unlink()
    info = edanb("info", copy)
    assert info.returncode == 0 and "17 recording(s) ok, 1 gap(s), 0 problem(s)" in info.stdout
    assert sum(gap.name in line for line in info.stdout.splitlines()) == 1   # one row: the gap, once
    prep = edanb("preprocess", copy, "--out", tmp_path / "cache", "--crop", "none", "--size", "16", "--workers", "1", "--quiet")
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert "17 recording(s) cached" in prep.stdout
    train = edanb("train", "--data", copy, "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--model", "naive",
                  "--folds", "3", "--no-progress")
    assert train.returncode == 0, train.stderr
    used = json.loads((tmp_path / "run" / "config.json").read_text())["recordings"]
    assert len(used) == 17 and "s4_T3" not in used and {"s4_T1", "s4_T2"} <= set(used)
    tested = pd.read_parquet(tmp_path / "run" / "predictions.parquet").recording.unique()
    assert "s4_T1" in tested and "s4_T3" not in tested


# --- folds stratified by group ---

def test_every_test_fold_holds_both_groups(grouped, tmp_path):
    groups = {f"s{n}": subject_group(0, n) for n in range(1, 7)}
    assert sorted(groups.values()).count("ctrl") == 3
    assert edanb("split", grouped, "--out", tmp_path / "folds", "--kfold", "3").returncode == 0
    for fold in sorted((tmp_path / "folds").glob("fold*.json")):
        test = json.loads(fold.read_text())["test"]
        assert sorted(groups[s] for s in test) == ["ctrl", "test"], (fold.name, test)


# --- exclusion lists ---

def test_an_exclusion_file_leaves_out_recordings_and_subjects_and_the_run_records_them(grouped, tmp_path):
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# chosen by hand\ns2_T3\ns5      # the whole subject\n")
    prep = edanb("preprocess", grouped, "--out", tmp_path / "cache", "--crop", "none", "--size", "16", "--workers", "1",
                 "--exclude", exclude)
    assert prep.returncode == 0 and prep.stdout.endswith("0 failed, 4 excluded\n") and "14 recording(s) cached" in prep.stdout
    assert not (tmp_path / "cache" / "s2_T3").exists() and not (tmp_path / "cache" / "s5_T1").exists()
    full = edanb("preprocess", grouped, "--out", tmp_path / "cache", "--crop", "none", "--size", "16", "--workers", "1", "--quiet")
    assert full.returncode == 0   # now every recording is cached: training leaves them out by itself
    train = edanb("train", "--data", grouped, "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--model", "naive",
                  "--folds", "3", "--exclude", exclude, "--no-progress")
    assert train.returncode == 0, train.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["excluded"] == ["s2_T3", "s5"] and len(saved["recordings"]) == 14
    assert not {"s2_T3", "s5_T1", "s5_T2", "s5_T3"} & set(saved["recordings"])
    tested = set(pd.read_parquet(tmp_path / "run" / "predictions.parquet").recording)
    assert not {"s2_T3", "s5_T1"} & tested and "s2_T1" in tested


def test_split_leaves_out_the_excluded_subjects(grouped, tmp_path):
    "A subject the file names is in no fold; one with a recording left still is; a name the dataset lacks is one warning."
    exclude = tmp_path / "exclude.txt"; exclude.write_text("s5\ns2_T3\ns99\n")
    result = edanb("split", grouped, "--out", tmp_path / "folds", "--kfold", "3", "--exclude", exclude)
    assert result.returncode == 0 and "left out 4 recording(s) named by" in result.stdout, result.stdout + result.stderr
    assert result.stderr.strip() == f"edanb: warning: {exclude}: names ['s99'], which this dataset does not have"
    tested = [s for fold in sorted((tmp_path / "folds").glob("fold*.json")) for s in json.loads(fold.read_text())["test"]]
    assert sorted(tested) == ["s1", "s2", "s3", "s4", "s6"]


def test_a_bad_exclusion_file_is_one_line_naming_it(grouped, tmp_path):
    exclude = tmp_path / "exclude.txt"; exclude.write_text("s2_T3\nvid_s3_T1.avi\n")
    result = edanb("preprocess", grouped, "--out", tmp_path / "cache", "--crop", "none", "--workers", "1", "--exclude", exclude)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert f"{exclude}: line 2: 'vid_s3_T1.avi' is neither a subject" in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="exclusion file is missing"): read_exclusions(tmp_path / "nope.txt")


# --- the groups in the synthetic world ---

def test_the_ctrl_groups_true_eda_rest_vs_stress_ceiling_is_lower():
    "Milder T2 and T3 (CTRL_TASK_GAIN) show in the true EDA: the same classifier tells rest from stress less well in ctrl."
    rows = []
    for n in range(1, 41):
        subject = make_subject(0, n)
        for task in ("T1", "T2", "T3"):
            phys, _ = recording_world(subject, 0, n, task, 180, 100, 1.0, "rich", (1.0, 3.0))
            rows.append(dict(subject=subject.name, group=subject_group(0, n), stress=task != "T1",
                             **level_free_features(phys.eda_us[::16], 4, SCR_MIN_US)))
    labels = rest_vs_stress(pd.DataFrame(rows))
    ceiling = {g: balanced_accuracy(labels[labels.group == g]) for g in ("test", "ctrl")}
    assert ceiling["test"] - ceiling["ctrl"] >= 0.05, ceiling
    arousal = {g: np.mean([recording_world(make_subject(0, n), 0, n, "T3", 60, 10, 1.0, "rich", (1.0, 3.0))[0].arousal.mean()
                           for n in range(1, 21) if subject_group(0, n) == g]) for g in ("test", "ctrl")}
    assert arousal["ctrl"] < arousal["test"] - 0.1, arousal


def test_the_simple_world_has_groups_on_paper_only(tmp_path):
    "The simple world writes the metadata files, and its physiology is the same in both groups (its figures do not move)."
    subject = make_subject(0, 2)
    assert subject_group(0, 2) == "ctrl" or subject_group(0, 1) == "ctrl"
    ctrl = next(n for n in (1, 2) if subject_group(0, n) == "ctrl")
    simple = recording_world(make_subject(0, ctrl), 0, ctrl, "T3", 20, 10, 1.0, "simple", (1.0, 3.0))[0]
    from edanb.synth import simulate_physiology, stream
    plain = simulate_physiology(make_subject(0, ctrl), "T3", 20, stream(0, ctrl, 3, "physiology"), 1.0, stream(0, ctrl, 3, "pulse"))
    assert np.array_equal(simple.eda_us, plain.eda_us)


def test_an_exclusion_is_kept_everywhere_a_run_looks(grouped, tmp_path):
    "Subject scaling may not centre on an excluded rest recording; a run is tied to what it left out; a broken excluded recording is no failure."
    cache, exclude = tmp_path / "cache", tmp_path / "exclude.txt"
    broken = tmp_path / "ubfc"; shutil.copytree(grouped, broken)
    recording_paths(broken, "s3", "T2")["bvp"].unlink()                        # broken: the reason to exclude it
    exclude.write_text("s3_T2\ns400   # a typo\n")
    prep = edanb("preprocess", broken, "--out", cache, "--crop", "none", "--size", "16", "--workers", "1", "--exclude", exclude)
    assert prep.returncode == 0 and prep.stdout.endswith("0 failed, 1 excluded\n"), prep.stdout
    assert prep.stderr.strip() == f"edanb: warning: {exclude}: names ['s400'], which this dataset does not have"
    exclude.write_text("s2_T1\n")
    base = ["train", "--data", grouped, "--cache", cache, "--model", "naive", "--folds", "3", "--no-progress", "--exclude", exclude]
    subject = edanb(*base, "--out", tmp_path / "subject", "--eda-scaling", "subject")
    assert subject.returncode == 1 and subject.stderr.count("\n") == 1
    assert f"{exclude}: excludes s2_T1, but subject scaling centres s2_T2 on it: exclude the subject (s2) too" in subject.stderr
    assert edanb(*base, "--out", tmp_path / "run").returncode == 0
    exclude.write_text("s2\n")                                                   # the file changed after the run
    again = edanb(*base, "--out", tmp_path / "run")
    assert again.returncode == 1 and "holds a run that left out ['s2_T1'], not ['s2']" in again.stderr


# --- results by group ---

def test_a_run_scores_each_group_and_the_summary_shows_them(grouped, tmp_path):
    "metrics.json and config.json record the groups; r and rest vs stress come per group, beside the true-EDA ceiling."
    from edanb.study import group_answer, group_table, summary_table
    cache, results = tmp_path / "cache", tmp_path / "results"
    assert edanb("preprocess", grouped, "--out", cache, "--crop", "none", "--size", "16", "--workers", "1", "--quiet").returncode == 0
    train = edanb("train", "--data", grouped, "--cache", cache, "--out", results / "naive", "--model", "naive", "--folds", "3",
                  "--no-progress")
    assert train.returncode == 0, train.stderr
    groups = {f"s{n}": subject_group(0, n) for n in range(1, 7)}
    metrics = json.loads((results / "naive" / "metrics.json").read_text())
    assert json.loads((results / "naive" / "config.json").read_text())["groups"] == groups == metrics["groups"]
    r = pd.DataFrame(metrics["by_group"]).query("metric == 'r'").set_index(["group", "model"])
    assert list(dict.fromkeys(r.index.get_level_values(0))) == ["test", "ctrl"]
    assert (r.loc[[("test", "elapsed_task"), ("ctrl", "elapsed_task"), ("ctrl", "oracle.json")], "subjects"] == 3).all()
    per_subject = pd.DataFrame(metrics["per_subject"]).query("model == 'elapsed_task'").set_index("subject").r
    ctrl = [s for s, g in groups.items() if g == "ctrl"]
    assert np.isclose(r.loc[("ctrl", "elapsed_task"), "mean"], per_subject[ctrl].mean())
    summary = summary_table(results)
    table = group_table(results, summary)
    assert list(table.group) == ["test", "ctrl"] and list(table.subjects) == [3, 3]
    assert table.rest_vs_stress.str.startswith("0.50").all()                # naive, a constant: chance in each group
    assert not (table["true EDA rest_vs_stress"] == "n/a").any() and (results / "summary_groups.csv").exists()
    answer = group_answer(table, summary.run.iat[0])
    assert "scores test (3 subjects) " in answer and "; ctrl (3 subjects) " in answer, answer
