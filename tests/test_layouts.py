"A lab's own recordings in BIDS physio: the same training pairs as UBFC-Phys's layout, any EDA rate, alignment by StartTime, one line per bad file."
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edanb.cli import main
from edanb.layouts import convert_to_bids, scan_dataset
from edanb.preprocess import PreprocessConfig, load_cached, preprocess_dataset

SIGNALS = ("t", "eda", "eda_flagged", "bvp", "hr", "frame_index")
FAST = PreprocessConfig(crop="none", size=32)   # the physio is what differs between the layouts; frames are read from the same video


def cached(root: Path, cache: Path, config: PreprocessConfig = FAST) -> Path:
    table = preprocess_dataset(root, cache, config, workers=1, progress=False)
    assert (table.status == "built").all(), table
    return cache


def entries(cache: Path) -> dict[str, dict]:
    return {p.name: load_cached(cache, p.name) for p in sorted(cache.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def ubfc_cache(tiny_root, tmp_path_factory) -> Path:
    return cached(tiny_root, tmp_path_factory.mktemp("ubfc") / "cache")


def converted_cache(tiny_root, tmp: Path, **convert) -> Path:
    convert_to_bids(tiny_root, tmp / "bids", **convert)
    return cached(tmp / "bids", tmp / "cache")


def test_bids_twin_gives_the_same_training_pairs(tiny_root, ubfc_cache, tmp_path):
    "The tiny dataset converted (EDA at 4 Hz, as recorded): every cached array, frames included, equals the UBFC-Phys layout's."
    ubfc, bids = entries(ubfc_cache), entries(converted_cache(tiny_root, tmp_path))
    assert list(bids) == list(ubfc) == [f"s{s}_T{t}" for s in (1, 2) for t in (1, 2, 3)]
    for name in ubfc:
        for key in SIGNALS + ("frames",):
            np.testing.assert_array_equal(bids[name][key], ubfc[name][key], err_msg=f"{name} {key}")


def test_a_start_time_gives_the_same_pairs_as_a_file_cut_to_match(tiny_root, tmp_path):
    "EDA at 128 Hz starting 2.5 s before the video (and the BVP with it) reads exactly as the same EDA written from the video's start."
    shifted = entries(converted_cache(tiny_root, tmp_path / "shifted", eda_hz=128, start_s=-2.5))
    aligned = entries(converted_cache(tiny_root, tmp_path / "aligned", eda_hz=128, start_s=0.0))
    physio = tmp_path / "shifted" / "bids" / "sub-s1" / "beh" / "sub-s1_task-T1_recording-eda_physio.tsv.gz"
    assert json.loads(physio.with_name(physio.name.replace(".tsv.gz", ".json")).read_text())["StartTime"] == -2.5
    assert len(np.loadtxt(gzip.open(physio))) == (4 + 2.5) * 128          # the file holds the 2.5 s before the video
    for name in aligned:
        for key in SIGNALS:
            np.testing.assert_array_equal(shifted[name][key], aligned[name][key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("hz", [128, 1000])
def test_fast_sensors_are_brought_to_the_clock(tiny_root, ubfc_cache, tmp_path, hz):
    "EDA written at 128 Hz (a Shimmer) or 1000 Hz (a BIOPAC) comes back on the 4 Hz clock within 0.02 µS of the recorded 4 Hz series (the largest: a last sample on a steep rise, where the filter meets the held end)."
    fast, ubfc = entries(converted_cache(tiny_root, tmp_path, eda_hz=hz)), entries(ubfc_cache)
    for name in ubfc:
        assert len(fast[name]["eda"]) == len(ubfc[name]["eda"])
        assert np.abs(fast[name]["eda"] - ubfc[name]["eda"]).max() < 0.02, name
        np.testing.assert_array_equal(fast[name]["bvp"], ubfc[name]["bvp"])


def bids_dataset(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "bids"
    assert main(["synth", str(out), "--layout", "bids", "--subjects", "3", "--seconds", "4", "--size", "64", "--world", "simple",
                 "--workers", "1", "--quiet", *extra]) == 0
    return out


def test_synth_writes_bids_and_info_lists_rates_offsets_and_participants(tmp_path, capsys):
    out = bids_dataset(tmp_path, "--eda-hz", "128", "--eda-start", "-2.5")
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("\n\n")[0].splitlines()
    assert len(table) == 1 + 9 and "eda_hz" in table[0] and "start_s" in table[0]
    assert all(" 128.0 " in row and " -2.5 " in row and " 64.0 " in row for row in table[1:]), table
    assert "9 recording(s) ok, 0 gap(s), 0 problem(s)" in printed
    people = printed.split("\n\n")[1].splitlines()
    assert len(people) == 1 + 3 and "cognitive_before" in people[0]     # UBFC-Phys's metadata, carried through participants.tsv
    assert main(["synth", str(out), "--layout", "bids", "--subjects", "3", "--seconds", "4", "--size", "64", "--world", "simple",
                 "--workers", "1", "--quiet", "--eda-hz", "128", "--eda-start", "-2.5"]) == 0   # a rerun rewrites it
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a scan of one subject (as the decomposition's reference reads it) warns of no other row
        recordings, problems = scan_dataset(out, subjects=["s2"])
    assert [r.name for r in recordings] == ["s2_T1", "s2_T2", "s2_T3"] and not problems


def test_bad_bids_files_are_one_line_each_and_the_others_are_kept(tmp_path, capsys):
    out = bids_dataset(tmp_path)
    beh = lambda s: out / f"sub-{s}" / "beh"
    sidecar = lambda s, t, signal="eda": beh(s) / f"sub-{s}_task-{t}_recording-{signal}_physio.json"
    sidecar("s1", "T1").write_text(json.dumps({"Columns": ["eda"]}))                                          # no SamplingFrequency
    sidecar("s1", "T2").write_text(json.dumps({"SamplingFrequency": 4, "Columns": ["eda", "temp"]}))          # 2 columns named, 1 in the file
    sidecar("s1", "T3").write_text(json.dumps({"SamplingFrequency": 4, "Columns": ["temperature"]}))          # no EDA column
    short = beh("s2") / "sub-s2_task-T1_recording-eda_physio.tsv.gz"
    with gzip.open(short, "wt") as f: np.savetxt(f, np.full(6, 5.0))                                         # 1.5 s of a 4 s video
    people = pd.read_csv(out / "participants.tsv", sep="\t")
    pd.concat([people[people.participant_id != "sub-s3"], pd.DataFrame(dict(participant_id=["sub-s9"]))]).to_csv(
        out / "participants.tsv", sep="\t", index=False)
    description = json.loads((out / "dataset_description.json").read_text())
    del description["TaskRoles"]["T3"]
    (out / "dataset_description.json").write_text(json.dumps(description))
    capsys.readouterr()
    assert main(["info", str(out)]) == 1
    captured = capsys.readouterr()
    problems = [line for line in captured.out.splitlines() if "/sub-" in line]
    expected = {sidecar("s1", "T1"): "sidecar has no SamplingFrequency",
                sidecar("s1", "T2").with_name("sub-s1_task-T2_recording-eda_physio.tsv.gz"): "has 1 column(s) but its sidecar names 2",
                beh("s1") / "sub-s1_task-T3_recording-bvp_physio.tsv.gz": "no EDA column",
                short: "EDA covers 38% of the video sub-s2_task-T1_video.avi (1.5 of 4.0 s"}
    for path, words in expected.items():
        assert any(f"{path}: {words}" in line for line in problems), (path, problems)
    assert "5 recording(s) ok, 0 gap(s), 4 problem(s)" in captured.out
    warned = captured.err.splitlines()
    assert any("sub-s3 has recordings but no row" in w for w in warned) and any("sub-s9 has a row but no recordings" in w for w in warned), warned
    assert any("task 'T3' has no TaskRoles entry" in w for w in warned), warned


def test_a_model_that_reads_the_contact_pulse_refuses_a_dataset_without_one(tmp_path, capsys):
    "BIDS without a ppg/bvp column: preprocessing and a face-only model work; seqcnn_bvp with the contact BVP is one line naming why."
    out = bids_dataset(tmp_path)
    for pulse in out.glob("sub-*/beh/*_recording-bvp_physio.*"): pulse.unlink()
    recordings, problems = scan_dataset(out)
    assert len(recordings) == 9 and not problems and all(r.bvp is None for r in recordings)
    cache = cached(out, tmp_path / "cache")
    assert np.isnan(load_cached(cache, "s1_T1")["bvp"]).all()
    train = ["train", "--data", str(out), "--cache", str(cache), "--epochs", "1", "--folds", "3", "--window", "8", "--no-progress"]
    assert main([*train, "--model", "seqcnn_bvp", "--preset", "tiny", "--out", str(tmp_path / "bvp")]) == 1
    err = capsys.readouterr().err
    assert "seqcnn_bvp reads the contact BVP, which" in err and "--bvp-source video:pos" in err, err
    assert main([*train, "--model", "seqcnn", "--preset", "tiny", "--out", str(tmp_path / "face")]) == 0, capsys.readouterr().err
    assert (tmp_path / "face" / "metrics.json").is_file()


def test_upsampled_eda_passes_through_the_recorded_samples_without_overshoot(dataset, tmp_path):
    "A dropout to 0 µS (the rich world has them) converted to 128 Hz stays >= 0, and the 4 Hz ticks keep the recorded values."
    eda_file = dataset / "s1" / "eda_s1_T2.csv"
    eda = np.loadtxt(eda_file)
    eda[5:7] = 0.0
    np.savetxt(eda_file, eda, fmt="%.6f")
    convert_to_bids(dataset, tmp_path / "bids", eda_hz=128)
    recordings, problems = scan_dataset(tmp_path / "bids")
    assert not problems and len(recordings) == 6
    fast = next(r for r in recordings if r.name == "s1_T2").read_eda()
    assert len(fast) == len(eda) * 32 and fast.min() >= 0
    np.testing.assert_allclose(fast[::32], eda, atol=1e-6)


def test_a_variable_frame_rate_video_of_a_bids_recording_is_sampled_by_its_timestamps(dataset, tmp_path):
    "A phone-style MP4 with every third frame dropped (kept frames at their own times): each tick gets the kept frame nearest it."
    import subprocess
    import cv2
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")   # installed by `make test` (dev requirements)
    convert_to_bids(dataset, tmp_path / "bids")
    avi = tmp_path / "bids" / "sub-s1" / "beh" / "sub-s1_task-T1_video.avi"
    mp4 = avi.with_suffix(".mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(avi), "-vf", "select='not(eq(mod(n\\,3)\\,2))'",
                    "-fps_mode", "passthrough", "-enc_time_base", "1/1000", "-video_track_timescale", "1000", "-c:v", "libx264",
                    "-crf", "0", "-pix_fmt", "yuv444p", str(mp4)], check=True)
    kept = np.array([j for j in range(int(cv2.VideoCapture(str(avi)).get(cv2.CAP_PROP_FRAME_COUNT))) if j % 3 != 2])
    avi.unlink()
    cache = tmp_path / "cache"
    table = preprocess_dataset(tmp_path / "bids", cache, FAST, workers=1, progress=False)
    assert (table.status == "built").all(), table
    entry = load_cached(cache, "s1_T1")
    n = len(entry["eda"])
    nearest = np.abs(kept[None, :] / 35 - (np.arange(n) / 4)[:, None]).argmin(1)   # by each kept frame's original time
    assert n >= 15 and (entry["frame_index"] == nearest).all(), (entry["frame_index"], nearest)
    assert not (entry["frame_index"] == np.rint(np.arange(n) * 35 / 4)).all()          # by the nominal rate it would differ


def test_a_sidecar_edit_rebuilds_the_entry(tiny_root, tmp_path):
    "The sidecar holds the rate and StartTime: changing it (not the table) must not leave the cache's old alignment in place."
    convert_to_bids(tiny_root, tmp_path / "bids", eda_hz=128, start_s=-2.5)
    cache = cached(tmp_path / "bids", tmp_path / "cache")
    before = load_cached(cache, "s1_T1")["eda"].copy()
    sidecar = tmp_path / "bids" / "sub-s1" / "beh" / "sub-s1_task-T1_recording-eda_physio.json"
    meta = json.loads(sidecar.read_text()); meta["StartTime"] = -1.5
    sidecar.write_text(json.dumps(meta))
    table = preprocess_dataset(tmp_path / "bids", cache, FAST, workers=1, progress=False).set_index("recording")
    assert table.status["s1_T1"] == "built" and table.status["s1_T2"] == "cached"
    assert not np.array_equal(load_cached(cache, "s1_T1")["eda"], before)


def test_a_start_that_is_not_a_whole_sample_is_written_as_the_one_the_file_holds(tiny_root, tmp_path):
    "-0.3 s at 4 Hz puts one sample before the video: the sidecar says -0.25 s, and the reader gets the original samples back."
    convert_to_bids(tiny_root, tmp_path / "bids", start_s=-0.3)
    beh = tmp_path / "bids" / "sub-s1" / "beh"
    starts = [json.loads((beh / f"sub-s1_task-T1_recording-{s}_physio.json").read_text())["StartTime"] for s in ("eda", "bvp")]
    assert starts == [-0.25, -19 / 64]
    (original, *_), _ = scan_dataset(tiny_root)
    (twin, *_), _ = scan_dataset(tmp_path / "bids")
    np.testing.assert_allclose(twin.read_eda(), original.read_eda(), atol=1e-6)
    np.testing.assert_allclose(twin.read_bvp(), original.read_bvp(), atol=1e-6)


def test_the_camera_pulse_of_a_video_that_dropped_frames_keeps_its_rate(tmp_path):
    """Every other frame of a 35 fps recording's first half dropped (an MP4 keeping the others at their own times): the
    cheeks' trace is read at its even ticks from the frames nearest them, so POS finds the rendered heart rate in both
    halves; by the container's mean rate, the first half's pulse would be sped up and the second's slowed down."""
    import subprocess
    import cv2
    from edanb.pulse import camera_signals
    from edanb.synth import SynthConfig, generate
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    generate(tmp_path / "ubfc", SynthConfig(subjects=1, seconds=30, size=128, world="simple"), workers=1, progress=False)
    convert_to_bids(tmp_path / "ubfc", tmp_path / "bids")
    avi = tmp_path / "bids" / "sub-s1" / "beh" / "sub-s1_task-T1_video.avi"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(avi), "-vf", "select='gte(n\\,525)+not(mod(n\\,2))'",
                    "-fps_mode", "passthrough", "-enc_time_base", "1/1000", "-video_track_timescale", "1000", "-c:v", "libx264",
                    "-crf", "0", "-pix_fmt", "yuv444p", str(avi.with_suffix(".mp4"))], check=True)
    avi.unlink()
    cache = cached(tmp_path / "bids", tmp_path / "cache", PreprocessConfig(crop="none", size=32, pulse=True, pulse_every=1))
    assert load_cached(cache, "s1_T1")["meta"]["key"]["pulse_clock"] == "timestamps"   # a trace built before by the mean rate is rebuilt
    assert "pulse_clock" not in load_cached(cache, "s1_T2")["meta"]["key"]               # an AVI's key is as before
    truth = pd.read_csv(tmp_path / "ubfc" / "ground_truth" / "s1_T1_pulse.csv").heart_rate.mean()
    hr = camera_signals(load_cached(cache, "s1_T1"), "video:pos", cache / "s1_T1")["hr"]
    error = np.abs(hr - truth)
    assert np.median(error[:len(hr) // 2]) < 5 and np.median(error[len(hr) // 2:]) < 5, (np.median(hr[:len(hr) // 2]), np.median(hr[len(hr) // 2:]), truth)
