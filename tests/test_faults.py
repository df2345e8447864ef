"Faults a hostile but fair user meets: a damaged cache, training that diverges. Each is one line that names the culprit, and no wrong result."
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from edanb.cli import main
from edanb.experiment import run_grid


# --- a damaged cache: refused by training, rebuilt by preprocess ---

def _drop(path: Path): path.unlink()
def _truncate(path: Path): path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
def _as(dtype):
    def change(path: Path):
        array = np.load(path)
        np.save(path, (array / 255.0).astype(dtype) if array.dtype == np.uint8 else array.astype(dtype))
    return change
def _shift(path: Path): np.save(path, np.load(path) + 1)   # same shape and dtype, other values
def _smaller(path: Path): np.save(path, np.load(path)[:, ::2, ::2])   # frames of another crop size
def _empty_object(path: Path): path.write_text("{}")

DAMAGES = {   # id -> (file in the entry, what is done to it, words the message must hold)
    "meta missing": ("meta.json", _drop, "meta.json"),
    "meta truncated": ("meta.json", _truncate, "meta.json"),
    "array missing": ("hr.npy", _drop, "hr.npy is missing"),
    "array truncated": ("frames.npy", _truncate, "frames.npy is truncated"),
    "frames as float64": ("frames.npy", _as(np.float64), "frames.npy holds float64, not uint8"),
    "eda as int16": ("eda.npy", _as(np.int16), "eda.npy holds int16, not float32"),
    "eda changed": ("eda.npy", _shift, "eda.npy does not match its checksum"),
    "frames of another size": ("frames.npy", _smaller, "frames.npy holds uint8 [48, 16, 16, 3], not the uint8 [48, 32, 32, 3]"),
    "meta without fields": ("meta.json", _empty_object, "meta.json"),
}


@pytest.fixture
def damaged(small, tmp_path, request) -> dict:
    "A copy of the small cache with one entry damaged as `DAMAGES[request.param]` says."
    cache = Path(shutil.copytree(small["cache"], tmp_path / "cache"))
    name, damage, words = DAMAGES[request.param]
    damage(cache / "s2_T2" / name)
    return dict(data=small["data"], cache=cache, entry=cache / "s2_T2", words=words)


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_training_refuses_a_damaged_entry_in_one_line_naming_it(damaged, tmp_path, capsys):
    code = main(["train", "--data", damaged["data"], "--cache", str(damaged["cache"]), "--out", str(tmp_path / "run"),
                 "--model", "naive", "--folds", "3", "--window", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert str(damaged["entry"]) in err[0] and damaged["words"] in err[0] and "edanb preprocess" in err[0], err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_preprocess_rebuilds_a_damaged_entry_as_it_was(damaged, small, capsys):
    "The damaged entry is rebuilt, the others kept; the rebuilt files equal the intact cache's byte for byte (which trains)."
    args = ["preprocess", damaged["data"], "--out", str(damaged["cache"]), "--size", "32", "--landmarks", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("s2_T2"))
    assert " built " in row or (" rebuilt " in row and damaged["words"] in row), row
    assert all(" cached " in line for line in out.splitlines() if line.strip().startswith(("s1_T1", "s3_T2")))
    intact = Path(small["cache"]) / "s2_T2"
    assert sorted(p.name for p in damaged["entry"].iterdir()) == sorted(p.name for p in intact.iterdir())
    for path in intact.iterdir(): assert (damaged["entry"] / path.name).read_bytes() == path.read_bytes(), path.name


# --- training that diverges ---

@pytest.mark.parametrize("lr", [1e20, 1e6])   # the loss becomes NaN / explodes past any working run's
def test_a_diverging_run_stops_in_one_line_and_writes_no_metrics(small, tmp_path, capsys, lr):
    "No epoch after the divergence is saved or marked best; the run folder says why; no metrics as if the run were fine."
    out = tmp_path / "run"
    code = main(["train", "--data", small["data"], "--cache", small["cache"], "--out", str(out), "--model", "landmarks",
                 "--lr", str(lr), "--grad-clip", "0", "--epochs", "3", "--folds", "3", "--window", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"{out / 'fold0'}: training diverged in epoch 0 (" in err[0], err
    assert "lower --lr" in err[0] and "--grad-clip, now 0" in err[0]
    assert not (out / "metrics.json").exists() and not (out / "predictions.parquet").exists()
    assert not (out / "fold0" / "best.pt").exists() and not (out / "fold0" / "history.csv").exists()
    assert json.loads((out / "diverged.json").read_text()) == dict(fold=0, reason=err[0].split("error: ", 1)[1])


@pytest.mark.slow   # runs a grid with papermill
def test_a_diverging_cell_fails_with_its_reason_and_the_grid_goes_on(small, tmp_path):
    base = {**small, "model": "landmarks", "folds": 3, "epochs": 1, "window": 16, "stride": 4, "batch_size": 8, "grad_clip": 0.0}
    grid = tmp_path / "grid.yaml"; grid.write_text(yaml.safe_dump(dict(base=base, grid=dict(lr=[3e-3, 1e20]))))
    table = run_grid(grid, tmp_path / "results", jobs=2, progress=False).set_index("cell")
    diverged = table[table.status == "failed"]
    assert list(table.status.sort_values()) == ["done", "failed"] and len(diverged) == 1
    assert diverged.reason.iat[0].startswith("Diverged: ") and "training diverged in epoch 0" in diverged.reason.iat[0]
    assert not (tmp_path / "results" / diverged.index[0] / "metrics.json").exists()


# --- every user error one line, no traceback ---

TRAIN_ERRORS = [   # options after `edanb train --data --cache --out`, the words of its one line
    (["--model", "seqcnn", "--model-args", '{"nosuch": 1}'], "model_args ['nosuch']: not arguments of seqcnn"),
    (["--epochs", "0"], "epochs 0: must be at least 1"),
    (["--val-subjects", "-1"], "val_subjects -1: must be at least 0"),
    (["--lr", "0"], "lr 0.0: must be above 0"),
    (["--folds", "2"], "folds 2: 0 (one split) or at least 3"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--window", "100000"], "window 100000"),
    (["--device", "mps"], "device 'mps': not available here"),
    (["--data", "/nonexistent/ubfc"], "/nonexistent/ubfc: dataset folder does not exist"),
]


@pytest.mark.parametrize("options,words", TRAIN_ERRORS)
def test_a_bad_training_option_is_one_line_naming_it(small, tmp_path, capsys, options, words):
    code = main(["train", "--data", small["data"], "--cache", small["cache"], "--out", str(tmp_path / "run"),
                 "--folds", "3", "--no-progress", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and words in err[0], err


def test_a_gpu_that_is_not_there_is_one_line(small, tmp_path, capsys):
    import torch
    if torch.cuda.is_available(): pytest.skip("this machine has a GPU")
    code = main(["train", "--data", small["data"], "--cache", small["cache"], "--out", str(tmp_path / "run"),
                 "--folds", "3", "--no-progress", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no CUDA GPU is available here" in err[0], err


GRID_ERRORS = {   # grid file text -> the words of its one line
    "base: {epochs: 1}\ngrid: []\n": "holds no cell",
    "grid:\n  model: [seqcnn]\n  model: [naive]\n": "key 'model' repeated",
    "grid:\n  epochs: [1.5]\n": "epochs: expected int, got 1.5",
    "grid:\n  augment_p: [true]\n": "augment_p: expected float, got True",
    "grid:\n  model: [naive, nosuchmodel]\n": "cell model-nosuchmodel: unknown model 'nosuchmodel'",
    "grid:\n  lr: [0.001, -1]\n": "cell lr-1: lr -1: must be above 0",
    "grid:\n  model: [seqcnn]\n  model_args: ['{\"hiden\": 8}']\n": "model_args ['hiden']: not arguments of seqcnn",
}


@pytest.mark.parametrize("text", list(GRID_ERRORS))
def test_a_bad_grid_file_is_one_line_naming_it(tmp_path, capsys, text):
    grid = tmp_path / "grid.yaml"; grid.write_text(text)
    code = main(["run", str(grid), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(grid) in err[0] and GRID_ERRORS[text] in err[0], err
    assert not (tmp_path / "results").exists()


def test_a_failed_attempt_does_not_block_the_corrected_command(small, tmp_path, capsys):
    "`--folds 99` fails after writing config.json; `--folds 3` at the same --out replaces that attempt, a trained run is never replaced."
    base = ["train", "--data", small["data"], "--cache", small["cache"], "--out", str(tmp_path / "run"), "--model", "naive",
            "--window", "16", "--no-progress"]
    assert main(base + ["--folds", "99"]) == 1 and "k-fold needs" in capsys.readouterr().err
    assert main(base + ["--folds", "3"]) == 0
    assert "replaces an earlier attempt that never trained" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").exists()
    assert main(base + ["--folds", "4"]) == 1 and "holds a run with another configuration" in capsys.readouterr().err


@pytest.mark.slow   # runs a grid with papermill
def test_ctrl_c_on_a_grid_is_one_line_exit_130_and_leaves_no_cell_running(small, tmp_path):
    import signal, subprocess, sys, time
    base = {**small, "model": "seqcnn", "folds": 3, "epochs": 50, "window": 16, "stride": 4, "batch_size": 8}
    grid = tmp_path / "grid.yaml"; grid.write_text(yaml.safe_dump(dict(base=base, grid=dict(seed=[0, 1]))))
    exe = Path(sys.executable).with_name("edanb")
    process = subprocess.Popen([str(exe), "run", str(grid), "--results", str(tmp_path / "results"), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120   # wait until a cell has started (its params.json), then press Ctrl-C
    while not list((tmp_path / "results").glob("*/params.json")) and time.time() < deadline: time.sleep(0.5)
    time.sleep(3); process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    lines = [l for l in err.splitlines() if "pkg_resources" not in l and "resource_filename" not in l]
    assert process.returncode == 130 and lines == ["edanb run: interrupted"], (process.returncode, lines)
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "results")], capture_output=True, text=True).stdout.split()
    assert not left, f"cells still running after Ctrl-C: {left}"


# --- data the reader must not accept in silence ---

def test_negative_eda_is_one_problem_naming_the_file_and_a_missing_task_is_listed(dataset, capsys):
    eda = dataset / "s1" / "eda_s1_T2.csv"
    eda.write_text(eda.read_text().replace("\n", "\n-0.5\n", 1))
    for path in (dataset / "s2").glob("*_s2_T3.*"): path.unlink()          # the whole task: video, EDA and BVP
    code = main(["info", str(dataset)])
    out = capsys.readouterr().out
    assert code == 1 and f"{eda}: 1 negative value(s)" in out, out
    assert "vid_s2_T3.avi: gap: the whole task is missing" in out and "1 problem(s)" in out, out


# --- one writer per folder; no orphans ---

def _hold_lock(folder: Path):
    "Another process holding `folder`'s write lock, as a trainer or preprocess at work would."
    import subprocess, sys, time
    held = subprocess.Popen([sys.executable, "-c", f"from edanb.core import folder_lock; import time\nwith folder_lock({str(folder)!r}): time.sleep(900)"])
    for _ in range(200):
        if (folder / ".lock").exists() and (folder / ".lock").read_text(): return held
        time.sleep(0.1)
    raise AssertionError("the lock was never taken")


def test_a_second_writer_into_a_run_folder_or_a_cache_is_one_line(small, tmp_path, capsys):
    run, cache = tmp_path / "run", Path(shutil.copytree(small["cache"], tmp_path / "cache"))
    for folder, args in ((run, ["train", "--data", small["data"], "--cache", small["cache"], "--out", str(run), "--model", "naive",
                                "--folds", "3", "--window", "16", "--no-progress"]),
                         (cache, ["preprocess", small["data"], "--out", str(cache), "--size", "32", "--landmarks", "--workers", "1"])):
        held = _hold_lock(folder)
        try:
            assert main(args) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{folder}: in use by process {held.pid}" in err[0], err
        finally: held.kill(); held.wait()
        assert main(args) == 0   # its holder gone, the lock is free


@pytest.mark.slow   # runs a grid with papermill
def test_a_grid_skips_a_cell_in_progress_elsewhere(small, tmp_path):
    base = {**small, "model": "naive", "folds": 3, "window": 16}
    grid = tmp_path / "grid.yaml"; grid.write_text(yaml.safe_dump(dict(base=base, grid=dict(seed=[0, 1]))))
    held = _hold_lock(tmp_path / "results" / "seed-1")
    try: table = run_grid(grid, tmp_path / "results", jobs=1, progress=False).set_index("cell")
    finally: held.kill(); held.wait()
    assert table.status.to_dict() == {"seed-0": "done", "seed-1": "skipped"}
    assert table.reason["seed-1"] == "in progress elsewhere (its run folder is locked)"
    assert not (tmp_path / "results" / "seed-1" / "params.json").exists()   # its folder untouched


@pytest.mark.slow   # runs a grid with papermill
def test_a_killed_grid_leaves_no_trainer_behind(small, tmp_path):
    import signal, subprocess, sys, time
    base = {**small, "model": "seqcnn", "folds": 3, "epochs": 50, "window": 16, "stride": 4, "batch_size": 8}
    grid = tmp_path / "grid.yaml"; grid.write_text(yaml.safe_dump(dict(base=base, grid=dict(seed=[0, 1]))))
    exe = Path(sys.executable).with_name("edanb")
    process = subprocess.Popen([str(exe), "run", str(grid), "--results", str(tmp_path / "results"), "--quiet", "--jobs", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock, deadline = tmp_path / "results" / "seed-0" / ".lock", time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline: time.sleep(0.5)
    trainer = int(lock.read_text().split()[-1])            # the kernel that trains, holding the run folder's lock
    process.kill(); process.wait()                          # SIGKILL: the grid runs no cleanup of its own
    deadline = time.time() + 30
    while Path(f"/proc/{trainer}").exists() and time.time() < deadline: time.sleep(0.5)
    assert not Path(f"/proc/{trainer}").exists(), "the cell's trainer lived on after its grid was killed"
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "results")], capture_output=True, text=True).stdout.split()
    assert not left, f"papermill lived on: {left}"


# --- full disks: one line naming the file and the disk, the other recordings finish, nothing half-written is left ---

@pytest.fixture
def small_disk(tmp_path):
    "A folder on a 1 MB tmpfs of its own (`mount -o remount,size=...` grows it); needs root."
    import os, subprocess
    if os.geteuid() != 0: pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"; disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _grow(disk: Path, size: str):
    import subprocess
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_during_preprocessing_fails_what_does_not_fit_and_prints_the_table(small, small_disk, capsys, workers):
    cache = small_disk / "cache"
    args = ["preprocess", small["data"], "--out", str(cache), "--size", "32", "--landmarks", "--workers", str(workers)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("no space left on") >= 10 and f"no space left on {small_disk} (need 0.2 MB" in out, out
    assert out.count(" built ") >= 2 and all(f"s{s}_T{t}" in out for s in range(1, 7) for t in (1, 2, 3)), out
    assert not _leftovers(cache)
    _grow(small_disk, "8m")
    assert main(args) == 0 and "no space" not in capsys.readouterr().out


def test_a_disk_that_fills_while_an_entry_is_written_is_an_error_not_a_bus_error(small, small_disk):
    """The space check is bypassed, as when another process fills the disk meanwhile. 72 px frames (0.75 MB an entry) do
    not fit beside the first entry: writing them through a sparse memory map would kill the process with SIGBUS."""
    import subprocess, sys
    script = ("import json, edanb.preprocess as p; p.check_space = lambda *a: None\n"
              f"t = p.preprocess_dataset({small['data']!r}, {str(small_disk / 'cache')!r}, p.PreprocessConfig(size=72),"
              " workers=1, progress=False)\nprint(json.dumps(t.error.tolist()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors[0] == "" and errors[1].startswith(f"{small_disk / 'cache' / 's1_T2'}: no space left on {small_disk} ("), errors
    assert sum("no space left on" in e for e in errors) == 17, errors
    assert not _leftovers(small_disk / "cache")


def test_a_full_disk_during_training_is_one_line_and_the_run_resumes_once_there_is_space(small, small_disk, capsys):
    "A seqcnn run of 3 folds needs about 6 MB (each fold's last.pt is 1.5 MB): on 3 MB a later checkpoint does not fit."
    _grow(small_disk, "3m")
    args = ["train", "--data", small["data"], "--cache", small["cache"], "--out", str(small_disk / "run"), "--model", "seqcnn",
            "--folds", "3", "--epochs", "2", "--window", "16", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edanb train: error: {small_disk / 'run'}/fold") and ".pt: no space left on" in err[0], err
    assert not _leftovers(small_disk / "run") and not (small_disk / "run" / "metrics.json").exists()
    _grow(small_disk, "16m")
    assert main(args) == 0 and (small_disk / "run" / "metrics.json").exists()


# --- a video in which no face is ever found ---

def _faceless_video(path: Path, frames: int, width: int = 128, height: int = 72):
    "An MJPEG video of the same length as the one it replaces, grey noise and no face."
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 35, (width, height))
    noise = np.random.default_rng(0).integers(100, 160, (frames, height, width, 3), dtype=np.uint8)
    for frame in noise: writer.write(frame)
    writer.release()


def test_a_video_with_no_face_fails_in_one_line_and_the_others_are_built(small, tmp_path, capsys):
    import cv2
    data = Path(shutil.copytree(small["data"], tmp_path / "ubfc"))
    video = data / "s1" / "vid_s1_T2.avi"
    frames = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))
    _faceless_video(video, frames)
    assert main(["preprocess", str(data), "--out", str(tmp_path / "cache"), "--size", "32", "--workers", "2", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{video}: no face found in any of its" in out and "128x72 video" in out and "--crop none" in out, out
    assert "17 recording(s) cached" in out and "1 failed" in out, out
    assert not (tmp_path / "cache" / "s1_T2").exists() and not _leftovers(tmp_path / "cache")
    assert main(["preprocess", str(data), "--out", str(tmp_path / "none"), "--size", "32", "--crop", "none", "--workers", "2",
                 "--quiet"]) == 0   # the frame's centre, as asked for
