"The UBFC-Phys reader: one test per bad input, each asserting that the error names the file."
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from edanb.data import (DataError, discover, load_recording, read_signal, recording_paths, scan, subject_folders)


def paths(root, subject="s1", task="T2"): return recording_paths(root, subject, task)


def expect_problem(root, path: Path, words: str):
    "Discovery raises a DataError for `path` containing `words`, and skip mode keeps the other 5 recordings."
    with pytest.raises(DataError) as info:
        discover(root)
    assert info.value.path == path and str(path) in str(info.value) and words in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = discover(root, on_error="skip")
    assert len(kept) == 5 and "s1_T2" not in [r.name for r in kept]
    assert any(str(path) in str(w.message) for w in caught)


def test_valid_dataset_is_read(dataset):
    recordings = discover(dataset)
    assert [r.name for r in recordings] == [f"s{s}_T{t}" for s in (1, 2) for t in (1, 2, 3)]
    r = recordings[0]
    assert (r.n_frames, r.fps, r.width, r.eda_len, r.bvp_len) == (140, 35.0, 64, 16, 256)
    assert r.duration == pytest.approx(4.0) and r.info.name == "info_s1.txt"
    assert np.allclose(r.read_eda(), np.loadtxt(r.eda))


def test_missing_file(dataset):
    p = paths(dataset)["eda"]; p.unlink()
    expect_problem(dataset, p, "file is missing")


def test_a_missing_video_is_a_gap_listed_once_not_a_failure(dataset):
    "As UBFC-Phys's vid_s40_T3.avi: the recording's EDA and BVP are there, its video is not."
    p = paths(dataset)["video"]; p.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = discover(dataset)
    assert len(kept) == 5 and "s1_T2" not in [r.name for r in kept] and "s1_T1" in [r.name for r in kept]
    assert [str(w.message) for w in caught if str(p) in str(w.message)] == [f"skipped: {p}: gap: the video is missing "
                                                                          "(its EDA and BVP are there); the subject's other recordings are used"]


def test_a_missing_video_and_signal_is_a_problem(dataset):
    video, eda = paths(dataset)["video"], paths(dataset)["eda"]; video.unlink(); eda.unlink()
    expect_problem(dataset, eda, "file is missing")


def test_empty_csv(dataset):
    p = paths(dataset)["bvp"]; p.write_text("")
    expect_problem(dataset, p, "file is empty")


def test_non_numeric_line(dataset):
    p = paths(dataset)["eda"]; lines = p.read_text().splitlines(); lines[3] = "1,5"
    p.write_text("\n".join(lines) + "\n")
    expect_problem(dataset, p, "line 4: '1,5' is not a number")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_value(dataset, bad):
    p = paths(dataset)["bvp"]; lines = p.read_text().splitlines(); lines[10] = bad
    p.write_text("\n".join(lines) + "\n")
    expect_problem(dataset, p, f"line 11: value {bad} is not finite")


def test_binary_csv(dataset):
    p = paths(dataset)["eda"]; p.write_bytes(b"\xff\xfe\x00\x81" * 10)
    expect_problem(dataset, p, "not a text file")


def test_text_file_renamed_avi(dataset):
    p = paths(dataset)["video"]; p.write_text("this is not a video\n")
    expect_problem(dataset, p, "cannot be opened as a video")


def test_zero_byte_video(dataset):
    p = paths(dataset)["video"]; p.write_bytes(b"")
    expect_problem(dataset, p, "empty (0 bytes)")


def test_video_with_zero_frames(dataset):
    p = paths(dataset)["video"]
    cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 35, (64, 64)).release()
    expect_problem(dataset, p, "zero frames")


def test_truncated_video(dataset):
    p = paths(dataset)["video"]; data = p.read_bytes(); p.write_bytes(data[: len(data) // 2])
    expect_problem(dataset, p, "truncated")


def test_eda_shorter_than_video(dataset):
    p = paths(dataset)["eda"]; p.write_text("\n".join(p.read_text().splitlines()[:8]) + "\n")  # 2 s of 4
    expect_problem(dataset, p, "EDA lasts 2.00 s but the video vid_s1_T2.avi lasts 4.00 s")


def test_bvp_longer_than_video(dataset):
    p = paths(dataset)["bvp"]; p.write_text(p.read_text() * 2)
    expect_problem(dataset, p, "BVP lasts 8.00 s")


def test_tolerance_accepts_small_disagreement(dataset):
    p = paths(dataset)["eda"]; p.write_text("\n".join(p.read_text().splitlines()[:14]) + "\n")  # 0.5 s short
    assert load_recording(dataset, "s1", "T2").eda_len == 14
    with pytest.raises(DataError, match="tolerance 0.25 s"):
        load_recording(dataset, "s1", "T2", tolerance_s=0.25)


def test_raise_mode_counts_further_problems(dataset):
    for task in ("T1", "T2"): paths(dataset, "s2", task)["eda"].write_text("x\n")
    with pytest.raises(DataError) as info:
        discover(dataset)
    assert "1 more problem(s)" in "".join(getattr(info.value, "__notes__", []))


def test_subjects_in_numeric_order(dataset):
    (dataset / "s2").rename(dataset / "s10")
    for f in (dataset / "s10").iterdir(): f.rename(f.with_name(f.name.replace("s2", "s10")))
    (dataset / "notes").mkdir()          # folders that are not s{N} are ignored
    (dataset / "s3").mkdir()             # ... but an empty subject folder is a problem
    assert [p.name for p in subject_folders(dataset)] == ["s1", "s3", "s10"]
    recordings, problems = scan(dataset)
    assert [r.subject for r in recordings] == ["s1"] * 3 + ["s10"] * 3
    assert [p.path.name for p in problems] == ["s3"] and "no recordings" in str(problems[0])


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DataError, match="dataset folder does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(DataError, match=f"{tmp_path}: no subject folders"):
        discover(tmp_path)


def test_read_signal_ignores_blank_lines(tmp_path):
    p = tmp_path / "s.csv"; p.write_text("1\n\n2.5\n  \n")
    assert read_signal(p).tolist() == [1.0, 2.5]


def test_validation_does_not_decode_whole_video(dataset, monkeypatch):
    "probe_video reads at most two frames, whatever the video's length."
    reads = []
    real = cv2.VideoCapture
    class Counting:
        def __init__(self, *a): self.cap = real(*a)
        def grab(self): reads.append(1); return self.cap.grab()
        def read(self): reads.append(1); return self.cap.read()
        def __getattr__(self, name): return getattr(self.cap, name)
    monkeypatch.setattr(cv2, "VideoCapture", Counting)
    load_recording(dataset, "s1", "T1")
    assert len(reads) == 2


def edanb(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("edanb")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_info_ok_and_with_problems(dataset):
    ok = edanb("info", dataset)
    assert ok.returncode == 0 and "6 recording(s) ok, 0 gap(s), 0 problem(s)" in ok.stdout and "s2_T3" in ok.stdout
    bad = paths(dataset)["video"]; bad.write_bytes(b"")
    result = edanb("info", dataset)
    assert result.returncode == 1 and "5 recording(s) ok, 0 gap(s), 1 problem(s)" in result.stdout
    assert str(bad) in result.stdout
