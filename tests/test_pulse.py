"The camera pulse (edanb preprocess --pulse, edanb.pulse, edanb pulse, --bvp-source video:<method>): accuracy, the null control, bad input."
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import make_dataset
from edanb.data import DataError, load_recording
from edanb.preprocess import PreprocessConfig, cache_key, load_cached, preprocess_dataset, preprocess_recording, skin_trace
from edanb.pulse import evaluate_pulse, pulse_table

BIN = Path(sys.executable).parent


def edanb(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "edanb"), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def pulse_data(tmp_path_factory) -> dict:
    "Three subjects, 32 s per task at the demo's 128 px, coupled and null, each cached with the trace (32 px crops, as the demo)."
    out = {}
    for name, coupling in (("coupled", 1.0), ("null", 0.0)):
        root = make_dataset(tmp_path_factory, f"pulse-{name}", subjects=3, seconds=32, size=128,
                            video_coupling=coupling, pulse_coupling=coupling)
        cache = root.parent / "cache"
        table = preprocess_dataset(root, cache, PreprocessConfig(size=32, pulse=True), workers=2, progress=False)
        assert (table.status == "built").all(), table
        out[name] = (root, cache)
    return out


def test_pos_and_chrom_find_the_contact_heart_rate_and_the_null_video_holds_no_pulse(pulse_data):
    tables = {}
    for name, (root, cache) in pulse_data.items():
        windows, problems = evaluate_pulse(root, cache, window_s=20, step_s=2, progress=False)
        assert problems == []
        tables[name] = {reference: pulse_table(windows, reference=reference, n_boot=100).set_index("method")
                        for reference in ("contact_hr", "truth_hr")}
    coupled, null = tables["coupled"]["contact_hr"], tables["null"]["contact_hr"]
    assert coupled.mae["pos"] <= 3 and coupled.mae["chrom"] <= 3, coupled
    assert tables["coupled"]["truth_hr"].mae["pos"] <= 3            # against the heart rate the generator rendered
    assert null.mae["pos"] > 3 * coupled.mae["pos"], (null, coupled)  # no pulse in the video: no heart rate either
    assert null.mae["pos"] > 0.5 * null.mae["mean_hr"]                # about as far off as guessing the others' mean
    assert coupled.snr["pos"] > null.snr["pos"] + 3


def test_the_trace_is_cached_beside_the_samples_with_its_own_clock(pulse_data):
    root, cache = pulse_data["coupled"]
    entry = load_cached(cache, "s1_T2")
    meta = entry["meta"]
    assert meta["trace_hz"] == pytest.approx(17.5) and meta["trace_missing"] <= 0.2 * meta["trace_samples"]
    assert entry["rgb"].shape == (meta["trace_samples"], 3) and np.isfinite(entry["rgb"]).all()
    assert np.allclose(np.diff(entry["rgb_t"]), 2 / 35)
    rec = load_recording(root, "s1", "T2")
    assert cache_key(rec, PreprocessConfig(size=16, pulse=True)) != cache_key(rec, PreprocessConfig(size=16))
    assert "pulse" not in cache_key(rec, PreprocessConfig(size=16))["config"]   # entries built before the option stay valid
    assert cache_key(rec, PreprocessConfig(size=16, pulse_every=3)) == cache_key(rec, PreprocessConfig(size=16))   # no trace: no step


def test_edanb_pulse_prints_a_table_per_reference_and_names_a_recording_too_short(pulse_data, tmp_path):
    root, cache = pulse_data["coupled"]
    result = edanb("pulse", root, "--cache", cache, "--window-s", "20", "--methods", "pos", "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "against contact_hr" in result.stdout and "against truth_hr" in result.stdout and "mean_hr" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"windows.csv", "pooled.csv", "subject.csv", "recording.csv"}
    result = edanb("pulse", root, "--cache", cache, "--window-s", "40", "--methods", "pos", "--quiet")   # longer than the videos
    assert result.returncode == 1 and result.stdout.count("shorter than one 40 s heart-rate window") == 9, result.stdout
    assert f"{root}/s1/vid_s1_T1.avi" in result.stdout
    result = edanb("pulse", root, "--cache", cache, "--methods", "ica")
    assert result.returncode == 1 and "unknown rPPG method(s) ['ica']" in result.stderr


def test_a_trace_with_too_few_faces_is_refused_naming_the_video(pulse_data):
    root, _ = pulse_data["coupled"]
    rec = load_recording(root, "s1", "T1")
    path = np.tile([64.0, 64.0, 60.0], (40, 1))
    lost = np.arange(40) % 4 != 0                                      # 3 of 4 detections found no face
    with pytest.raises(DataError, match=r"vid_s1_T1.avi: no face on 7\d% of its pulse trace"):
        skin_trace(rec.video, rec.fps, path, lost, 4.0)
    trace = skin_trace(rec.video, rec.fps, path, np.arange(40) < 8, 4.0)   # a face lost for 2 s: interpolated and counted
    assert 0.15 < trace["rgb_missing"].mean() < 0.25 and np.isfinite(trace["rgb"]).all()
    n = int(cv2.VideoCapture(str(rec.video)).get(cv2.CAP_PROP_FRAME_COUNT))
    stalled = np.arange(n) / rec.fps + 3.0 * (np.arange(n) >= 140)       # timestamps with a 3 s stall after frame 139 (4 s)
    trace = skin_trace(rec.video, rec.fps, path, np.zeros(40, bool), 4.0, times=stalled)
    assert trace["rgb_missing"][:68].sum() == 0 and 0.25 < trace["rgb_missing"].mean() < 0.35   # the stall's ticks, not a held frame


def test_a_trace_below_15_hz_is_refused(pulse_data, tmp_path):
    root, _ = pulse_data["coupled"]
    with pytest.raises(DataError, match=r"vid_s1_T1.avi: its pulse trace would be 11.6667 Hz .* use --pulse-every 2"):
        preprocess_recording(load_recording(root, "s1", "T1"), tmp_path, PreprocessConfig(size=16, pulse=True, pulse_every=3))


def test_video_bvp_trains_and_a_cache_without_the_trace_is_one_line(pulse_data, tmp_path):
    root, cache = pulse_data["coupled"]
    common = ["--data", root, "--folds", "3", "--val-subjects", "0", "--epochs", "1", "--window", "16", "--stride", "16",
              "--model", "seqcnn_bvp", "--no-progress"]
    result = edanb("train", *common, "--cache", cache, "--bvp-source", "video:pos", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["bvp_source"] == "video:pos" and "bvp_only" in metrics["models"]
    bare = tmp_path / "bare"
    preprocess_dataset(root, bare, PreprocessConfig(size=32), workers=2, progress=False)
    result = edanb("train", *common, "--cache", bare, "--bvp-source", "video:pos", "--out", tmp_path / "run2")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "bvp_source video:pos: no pulse trace in this cache entry (preprocess with --pulse)" in result.stderr
    result = edanb("train", *common, "--cache", cache, "--bvp-source", "video:ica", "--out", tmp_path / "run3")
    assert result.returncode == 1 and "bvp_source 'video:ica'" in result.stderr


def test_the_bvp_only_reference_of_a_camera_run_reads_the_camera_heart_rate(pulse_data):
    from edanb.metrics import has_heart_rate, heart_rate_features
    from edanb.pulse import camera_signals
    _, cache = pulse_data["coupled"]
    entry = load_cached(cache, "s2_T3")
    camera = camera_signals(entry, "video:pos", cache / "s2_T3")["hr"]
    features = heart_rate_features(cache, 4.0, "video:pos")("s2_T3")
    filled = np.where(np.isfinite(camera), camera, np.nanmedian(camera))
    assert np.allclose(features[:, 0], filled)
    assert not np.allclose(features[:, 0], heart_rate_features(cache, 4.0)("s2_T3")[:, 0])   # not the contact heart rate
    assert has_heart_rate(cache, ["s2_T3"], "recording", "video:pos")
