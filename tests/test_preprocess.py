"Preprocessing: the EDA clock, selective decoding, face crops, the cache and its faults."
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from edanb.data import BVP_HZ, EDA_HZ, DataError, discover, load_recording, recording_paths
from edanb.preprocess import (FrameReader, PreprocessConfig, crop_steps, load_cached, preprocess_dataset,
                              preprocess_recording, resample)

BITS, BLOCK = 12, 16   # frame index drawn as 12 black/white blocks of 16x16 px (4 x 3 grid on 64x48)


def index_frame(i: int) -> np.ndarray:
    "A 64x64 frame showing `i` as 12 black/white 16x16 blocks (4 x 3 grid on the top 48 rows)."
    bits = np.array([(i >> b) & 1 for b in range(BITS)], np.uint8).reshape(3, 4) * 255
    top = np.repeat(np.repeat(bits, BLOCK, 0), BLOCK, 1)
    return np.vstack([top, np.zeros((16, 64), np.uint8)])[..., None].repeat(3, 2)


def read_index(frame: np.ndarray) -> int:
    "The index an `index_frame` shows, after JPEG compression."
    blocks = frame[:48, :, 0].reshape(3, BLOCK, 4, BLOCK).mean((1, 3)).ravel() > 127
    return int(sum(int(b) << k for k, b in enumerate(blocks)))


def write_index_recording(root: Path, subject="s1", task="T1", frames=2110, eda_seconds=60.0, fourcc="MJPG"):
    "A recording whose video frames show their own index; by default the video runs 10 frames longer than EDA."
    p = recording_paths(root, subject, task)
    p["video"].parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(p["video"]), cv2.VideoWriter_fourcc(*fourcc), 35, (64, 64))
    for i in range(frames): writer.write(index_frame(i))
    writer.release()
    np.savetxt(p["eda"], np.linspace(2, 3, int(eda_seconds * EDA_HZ)))
    np.savetxt(p["bvp"], np.sin(np.arange(int(eda_seconds * BVP_HZ)) / BVP_HZ * 2 * np.pi * 1.2))
    return p


def test_index_frames_round_trip():
    assert all(read_index(index_frame(i)) == i for i in (0, 1, 7, 1000, 4095))


def test_sampling_picks_nearest_frame_over_a_whole_recording(tmp_path):
    "Over a whole minute, cached frame i is the video frame nearest t_i = i / 4 s (within half a frame)."
    write_index_recording(tmp_path / "data")
    rec = load_recording(tmp_path / "data", "s1", "T1")
    meta = preprocess_recording(rec, tmp_path / "cache", PreprocessConfig(crop="none", size=64))
    entry = load_cached(tmp_path / "cache", "s1_T1")
    assert meta["samples"] == 240 and meta["cut_s"]["video"] == pytest.approx(10 / 35)
    t = np.arange(240) / 4
    shown = np.array([read_index(f) for f in entry["frames"]])
    assert np.array_equal(entry["t"], t) and np.array_equal(shown, entry["frame_index"])
    assert np.abs(shown / 35 - t).max() <= 0.5 / 35 + 1e-12
    assert np.array_equal(shown, np.rint(t * 35))


def test_resampling_keeps_1hz_and_removes_7hz():
    t = np.arange(64 * 60) / 64
    tone, alias = np.sin(2 * np.pi * 1.0 * t), np.sin(2 * np.pi * 7.0 * t)
    out = resample(tone + alias, 64, 4)
    spectrum = np.abs(np.fft.rfft(out - resample(tone, 64, 4)))
    assert spectrum.max() < 0.05 * np.abs(np.fft.rfft(resample(tone, 64, 4))).max()


@pytest.mark.parametrize("fourcc", ["XVID", "mp4v"])
def test_fallback_decoding_for_other_codecs(tmp_path, fourcc):
    path = write_index_recording(tmp_path, frames=100, eda_seconds=2, fourcc=fourcc)["video"]
    with FrameReader(path) as reader:
        assert not reader.raw
        assert [read_index(reader.read(i)) for i in (0, 9, 18, 26, 99)] == [0, 9, 18, 26, 99]
        reader.reduction = 2
        assert reader.read(50).shape == (32, 32, 3)


def test_raw_mjpeg_matches_ordinary_decoding(tmp_path):
    path = write_index_recording(tmp_path, frames=50, eda_seconds=1)["video"]
    cap, frames = cv2.VideoCapture(str(path)), []
    for _ in range(50): frames.append(cap.read()[1][..., ::-1])
    with FrameReader(path) as reader:
        assert reader.raw
        for i in (0, 9, 49):
            assert np.abs(reader.read(i).astype(int) - frames[i]).mean() < 2


def test_face_crops_on_synthetic_data(synth_root, synth_cache):
    inside = total = 0
    for rec in discover(synth_root):
        entry = load_cached(synth_cache, rec.name)
        assert entry["meta"]["face_rate"] >= 0.95
        truth = pd.read_csv(synth_root / "ground_truth" / f"{rec.name}_face_boxes.csv").iloc[entry["frame_index"]]
        cx, cy = (truth.x0 + truth.x1).to_numpy() / 2, (truth.y0 + truth.y1).to_numpy() / 2
        x0, y0, side = entry["boxes"].T
        inside += ((x0 <= cx) & (cx <= x0 + side) & (y0 <= cy) & (cy <= y0 + side)).sum()
        total += len(cx)
    assert inside >= 0.95 * total


def true_centres(root: Path, name: str, frame_index: np.ndarray) -> np.ndarray:
    "Ground-truth face centres (x, y) of the sampled frames."
    truth = pd.read_csv(root / "ground_truth" / f"{name}_face_boxes.csv").iloc[frame_index]
    return np.stack([(truth.x0 + truth.x1).to_numpy() / 2, (truth.y0 + truth.y1).to_numpy() / 2], axis=1)


def crop_centres(boxes: np.ndarray) -> np.ndarray:
    return boxes[:, :2] + boxes[:, 2:] / 2


def test_crop_moves_on_every_step_not_once_per_detection(synth_root, synth_cache):
    "No periodic component at `detect_every`: the crop moves as much on steps ending on a detection as on the others."
    on, off = [], []
    for rec in discover(synth_root):
        entry = load_cached(synth_cache, rec.name)
        every = entry["meta"]["key"]["config"]["detect_every"]
        steps = crop_steps(entry["boxes"])
        detection = np.arange(1, len(steps) + 1) % every == 0
        on.append(steps[detection]); off.append(steps[~detection])
    on, off = np.concatenate(on).mean(), np.concatenate(off).mean()
    # before: 1.81 % of the side on detection steps, 0.00 % on the others; after: 0.56 % and 0.65 %
    assert off > 0.002 and 1 / 1.5 <= on / off <= 1.5, (on, off)


def test_crop_centre_near_true_face_on_every_sample(synth_root, synth_cache):
    "Crop centre to true face centre, in crop sides, less each recording's constant offset (HOG's box convention)."
    errors = []
    for rec in discover(synth_root):
        entry = load_cached(synth_cache, rec.name)
        error = crop_centres(entry["boxes"].astype(float)) - true_centres(synth_root, rec.name, entry["frame_index"])
        errors.append(np.hypot(*(error - error.mean(0)).T) / entry["boxes"][:, 2])
    errors = np.concatenate(errors)
    # before: 95th percentile 5.09 %, worst 8.00 %; after: 4.06 %, 7.51 % (the head's fast jitter, which one detection
    # a second cannot follow, is most of what is left)
    assert np.percentile(errors, 95) <= 0.045 and errors.max() <= 0.085, (np.percentile(errors, 95), errors.max())


def write_drifting(src_root: Path, root: Path, blank_s: tuple[float, float] | None = None, canvas: int = 224,
                   amplitude=(28, 20), period_s=(10.0, 7.0)) -> pd.DataFrame:
    "s1_T1 of `src_root` pasted on a larger canvas that sways slowly (optionally blank from/to `blank_s`); true boxes."
    src, dst = recording_paths(src_root, "s1", "T1"), recording_paths(root, "s1", "T1")
    dst["video"].parent.mkdir(parents=True, exist_ok=True)
    for kind in ("eda", "bvp"): dst[kind].write_bytes(src[kind].read_bytes())
    cap = cv2.VideoCapture(str(src["video"]))
    fps = cap.get(cv2.CAP_PROP_FPS)
    writer = cv2.VideoWriter(str(dst["video"]), cv2.VideoWriter_fourcc(*"MJPG"), fps, (canvas, canvas))
    shifts = []
    while (frame := cap.read()[1]) is not None:
        t, side = len(shifts) / fps, frame.shape[0]
        dx, dy = (int(round((canvas - side) / 2 + a * np.sin(2 * np.pi * t / p))) for a, p in zip(amplitude, period_s))
        out = np.full((canvas, canvas, 3), 128, np.uint8)
        if blank_s is None or not blank_s[0] <= t < blank_s[1]: out[dy:dy + side, dx:dx + side] = frame
        writer.write(out); shifts.append((dx, dy))
    writer.release()
    truth, (dx, dy) = pd.read_csv(src_root / "ground_truth" / "s1_T1_face_boxes.csv"), np.array(shifts).T
    return truth.assign(x0=truth.x0 + dx, x1=truth.x1 + dx, y0=truth.y0 + dy, y1=truth.y1 + dy)


def lag(follower: np.ndarray, leader: np.ndarray, most: int = 8) -> int:
    "The delay (samples) at which `follower` best correlates with `leader`."
    n = len(leader)
    return max(range(-most, most + 1),
               key=lambda k: np.corrcoef(follower[most + k:n - most + k], leader[most:n - most])[0, 1])


def test_crop_follows_a_swaying_head_without_lag(synth_root, tmp_path):
    truth = write_drifting(synth_root, tmp_path / "data")
    preprocess_recording(load_recording(tmp_path / "data", "s1", "T1"), tmp_path / "cache")
    entry = load_cached(tmp_path / "cache", "s1_T1")
    tx, ty = ((truth.x0 + truth.x1) / 2).to_numpy(), ((truth.y0 + truth.y1) / 2).to_numpy()
    true = np.stack([tx, ty], axis=1)[entry["frame_index"]]
    crop = crop_centres(entry["boxes"].astype(float))
    error = np.hypot(*(crop - true).T) / entry["boxes"][:, 2]
    # before: the crop trailed by 4 samples (one detection interval) in x and y, worst error 43 % of the side;
    # after: no lag, worst error 12 %
    assert lag(crop[:, 0], true[:, 0]) == 0 and lag(crop[:, 1], true[:, 1]) == 0
    assert error.max() <= 0.15, error.max()


def test_missed_detections_are_bridged_and_counted(synth_root, tmp_path):
    "No face from 10 to 15 s: the box is interpolated across the gap, and the samples nearest the misses are counted."
    truth = write_drifting(synth_root, tmp_path / "data", blank_s=(10, 15), amplitude=(0, 0))
    rec = load_recording(tmp_path / "data", "s1", "T1")
    meta = preprocess_recording(rec, tmp_path / "cache")
    entry = load_cached(tmp_path / "cache", "s1_T1")
    every, n = 4, meta["samples"]
    attempts = np.arange(0, n, every)
    seconds = entry["frame_index"][attempts] / rec.fps
    missed = attempts[(seconds >= 10) & (seconds < 15)]
    nearest = np.minimum((np.arange(n) + every // 2) // every * every, attempts[-1])
    assert meta["attempts"] == len(attempts) and meta["detections"] == len(attempts) - len(missed) == 25
    assert meta["fallback"] == np.isin(nearest, missed).sum() == 20
    centre_x, centre_y = ((truth.x0 + truth.x1) / 2).to_numpy(), ((truth.y0 + truth.y1) / 2).to_numpy()
    true = np.stack([centre_x, centre_y], axis=1)[entry["frame_index"]]
    gap = np.isin(nearest, missed)
    error = np.hypot(*(crop_centres(entry["boxes"].astype(float)) - true).T) / entry["boxes"][:, 2]
    side = entry["boxes"][:, 2]
    assert np.abs(side[gap] / side[~gap].mean() - 1).max() < 0.1   # a face-sized crop, not the whole frame ...
    assert error[gap].max() < 0.12, error[gap].max()               # ... where the face was before and after


def test_video_without_face_is_refused_and_crop_none_takes_the_centre(tmp_path):
    write_index_recording(tmp_path / "data", frames=35 * 8, eda_seconds=8)
    rec = load_recording(tmp_path / "data", "s1", "T1")
    with pytest.raises(DataError, match="vid_s1_T1.avi: no face found in any of its 8 detection attempts"):
        preprocess_recording(rec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "s1_T1").exists() and not list((tmp_path / "cache").glob(".*tmp-*"))
    meta = preprocess_recording(rec, tmp_path / "cache", PreprocessConfig(crop="none"))
    entry = load_cached(tmp_path / "cache", "s1_T1")
    assert meta["samples"] == 32 and (entry["boxes"] == [0, 0, 64]).all()   # the whole (square) frame, as asked


def test_cache_reuse_and_rebuild(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    first = preprocess_dataset(tiny_root, cache, PreprocessConfig(size=32, crop="none"), workers=1, progress=False)
    assert (first.status == "built").all()
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    again = preprocess_dataset(tiny_root, cache, PreprocessConfig(size=32, crop="none"), workers=1, progress=False)
    assert (again.status == "cached").all()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == stamps   # no work done
    changed = preprocess_dataset(tiny_root, cache, PreprocessConfig(size=24, crop="none"), workers=1, progress=False)
    assert (changed.status == "built").all() and load_cached(cache, "s1_T1")["frames"].shape[1:] == (24, 24, 3)


def test_changed_source_rebuilds(dataset, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(dataset, cache, PreprocessConfig(size=32, crop="none"), workers=1, progress=False)
    eda = recording_paths(dataset, "s2", "T1")["eda"]
    eda.write_text(eda.read_text().replace("\n", "0\n", 1))   # same length, new value
    table = preprocess_dataset(dataset, cache, PreprocessConfig(size=32, crop="none"), workers=1, progress=False).set_index("recording")
    assert table.status["s2_T1"] == "built" and (table.drop("s2_T1").status == "cached").all()


@pytest.mark.slow
def test_bad_recordings_are_named_and_others_cached(dataset, tmp_path):
    p = {task: recording_paths(dataset, "s1", task) for task in ("T1", "T2", "T3")}
    data = p["T1"]["video"].read_bytes(); p["T1"]["video"].write_bytes(data[: len(data) // 2])   # truncated
    p["T2"]["video"].write_bytes(b"")                                                            # zero bytes
    p["T3"]["video"].write_text("not a video\n")                                                 # text as .avi
    eda = recording_paths(dataset, "s2", "T1")["eda"]
    eda.write_text("\n".join(eda.read_text().splitlines()[:4]) + "\n")                          # EDA 3 s short
    exe = Path(sys.executable).with_name("edanb")
    result = subprocess.run([str(exe), "preprocess", str(dataset), "--out", str(tmp_path / "cache"), "--size", "32",
                             "--crop", "none", "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "2 recording(s) cached" in result.stdout and "4 failed" in result.stdout
    for path, words in ((p["T1"]["video"], "truncated"), (p["T2"]["video"], "0 bytes"),
                        (p["T3"]["video"], "cannot be opened"), (eda, "EDA lasts 1.00 s")):
        assert f"{path}: " in result.stdout and words in result.stdout
    assert sorted(d.name for d in (tmp_path / "cache").iterdir() if d.name != ".lock") == ["s2_T2", "s2_T3"]   # .lock: one writer


def cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_run_then_rerun_equals_uninterrupted(synth_root, tmp_path):
    exe = Path(sys.executable).with_name("edanb")
    args = ["preprocess", str(synth_root), "--size", "48", "--landmarks", "--quiet", "--workers", "2"]
    subprocess.run([str(exe), *args, "--out", str(tmp_path / "reference")], check=True, capture_output=True, timeout=600)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([str(exe), *args, "--out", str(cache)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(cache.glob("s*/meta.json")): time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    done = sorted(p.parent.name for p in cache.glob("s*/meta.json"))
    assert 0 < len(done) < 18, f"the kill should land mid-way, {len(done)} entries were complete"
    subprocess.run([str(exe), *args, "--out", str(cache)], check=True, capture_output=True, timeout=600)
    assert cache_files(cache) == cache_files(tmp_path / "reference")


@pytest.mark.dask
def test_a_dask_cluster_builds_the_same_cache_and_resumes(tiny_root, tmp_path):
    "One task per recording on a local Dask cluster the test starts: the cache equals a local run's, and a rerun resumes."
    from distributed import LocalCluster
    config = PreprocessConfig(size=32, crop="none")   # the tiny dataset's 64 px faces are too small for the detector
    preprocess_dataset(tiny_root, tmp_path / "local", config, workers=1, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        table = preprocess_dataset(tiny_root, tmp_path / "dask", config, progress=False, scheduler=cluster.scheduler_address)
        assert table.recording.tolist() == [f"s{s}_T{t}" for s in (1, 2) for t in (1, 2, 3)]   # in order, whatever finished first
        assert (table.status == "built").all()
        assert "preprocess_job" in cluster.scheduler.task_prefixes   # the workers did it
        assert cache_files(tmp_path / "dask") == cache_files(tmp_path / "local")
        import shutil; shutil.rmtree(tmp_path / "dask" / "s2_T1")   # as if its worker had died
        again = preprocess_dataset(tiny_root, tmp_path / "dask", config, progress=False,
                                   scheduler=cluster.scheduler_address).set_index("recording")
    assert again.status["s2_T1"] == "built" and (again.drop("s2_T1").status == "cached").all()
    assert cache_files(tmp_path / "dask") == cache_files(tmp_path / "local")


@pytest.mark.dask
def test_parallel_map_on_dask_reports_a_job_whose_worker_died_and_yields_the_others():
    "What `preprocess_dataset --scheduler` relies on: a recording that kills its worker becomes a failed row, not a crash."
    import os
    from distributed import LocalCluster
    from edanb.core import parallel_map
    work = lambda x: os._exit(1) if x == 1 else x * 10   # a lambda travels by value to the workers
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        out = list(parallel_map(work, [(x,) for x in range(4)], scheduler=cluster.scheduler_address,
                                on_error=lambda job, e: f"job {job[0]}: {type(e).__name__}"))
    # one answer per job, none lost; a job queued on the dying worker may die with it (Dask counts the death against it)
    answers = {o // 10 if isinstance(o, int) else int(o.split()[1].rstrip(":")): o for o in out}
    assert len(out) == 4 and sorted(answers) == [0, 1, 2, 3]
    assert answers[1] == "job 1: KilledWorker"
    assert all(a in (x * 10, f"job {x}: KilledWorker") for x, a in answers.items())
    assert any(isinstance(a, int) for a in answers.values())   # the others were computed
