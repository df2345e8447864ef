"`edanb export` and `edanb predict`: a trained run on a video of its own; bad videos and bad bundles are one line and exit 1."
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from edanb.cli import main


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory) -> dict:
    "A SeqCNN and a SeqCNN+BVP (contact), one epoch each on the small dataset, and a bundle of the first."
    out = tmp_path_factory.mktemp("predict")
    for model in ("seqcnn", "seqcnn_bvp"):
        assert main(["train", "--data", small["data"], "--cache", small["cache"], "--out", str(out / model), "--model", model,
                     "--folds", "3", "--epochs", "1", "--window", "16", "--no-progress"]) == 0
    assert main(["export", str(out / "seqcnn"), str(out / "bundle")]) == 0
    return dict(small, run=out / "seqcnn", bvp_run=out / "seqcnn_bvp", bundle=out / "bundle")


def _video(small: dict, name: str) -> Path:
    return Path(small["data"]) / name.split("_")[0] / f"vid_{name}.avi"


def test_predict_writes_the_csv_and_the_plot_and_matches_the_evaluation(trained, tmp_path, capsys):
    tested = pd.read_parquet(trained["run"] / "fold1" / "predictions.parquet").query("model == 'seqcnn'")
    name = tested.recording.iat[-1]
    assert main(["predict", str(_video(trained, name)), "--model", str(trained["bundle"]), "--folds", "1", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert "face found in 100% of detection attempts" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "eda.csv")
    assert list(table.columns) == ["time_s", "eda_change_us", "spread", "face"] and (tmp_path / "eda.png").stat().st_size > 10_000
    mine = tested[tested.recording == name]
    scale = __import__("json").loads((trained["run"] / "fold1" / "normaliser.json").read_text())["scale"]
    assert np.allclose(table.eda_change_us.to_numpy()[mine["sample"]], mine.pred * scale, atol=1e-5)
    assert np.allclose(table.time_s[:3], [0, 0.25, 0.5]) and (table.spread == 0).all()   # one fold: no spread


def test_a_bundle_predicts_without_the_run_or_its_cache(trained, tmp_path):
    bundle = Path(shutil.copytree(trained["bundle"], tmp_path / "bundle"))
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "fold0", "fold1", "fold2"]
    from edanb.predict import predict_video
    table = predict_video(_video(trained, "s2_T2"), bundle)
    assert table.attrs["folds"] == [0, 1, 2] and (table.spread > 0).all() and np.isfinite(table.eda_change_us).all()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_not_a_video_is_one_line(trained, capsys):
    eda = Path(trained["data"]) / "s1" / "eda_s1_T1.csv"
    assert main(["predict", str(eda), "--model", str(trained["bundle"]), "--quiet"]) == 1
    assert _one_error_line(capsys) == f"edanb predict: error: {eda}: cannot be opened as a video (OpenCV/FFmpeg cannot read it)"


def test_a_video_without_a_face_is_one_line(trained, tmp_path, capsys):
    video = tmp_path / "wall.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 35, (128, 72))
    for frame in np.random.default_rng(0).integers(100, 160, (35 * 6, 72, 128, 3), dtype=np.uint8): writer.write(frame)
    writer.release()
    assert main(["predict", str(video), "--model", str(trained["bundle"]), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"edanb predict: error: {video}: no face found in any of its") and "128x72 video" in line, line
    assert not (tmp_path / "out").exists()


def test_a_video_shorter_than_one_window_is_one_line(trained, tmp_path, capsys):
    source, video = cv2.VideoCapture(str(_video(trained, "s1_T1"))), tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 35, (96, 96))
    for _ in range(35 * 3): writer.write(source.read()[1])
    writer.release()
    assert main(["predict", str(video), "--model", str(trained["bundle"]), "--quiet"]) == 1
    assert _one_error_line(capsys) == (f"edanb predict: error: {video}: 3.0 s long: shorter than one window of the model (4 s)")


def test_an_incomplete_or_damaged_bundle_is_one_line(trained, tmp_path, capsys):
    video = str(_video(trained, "s1_T1"))
    bundle = Path(shutil.copytree(trained["bundle"], tmp_path / "bundle"))
    (bundle / "fold2" / "best.pt").unlink()
    assert main(["predict", video, "--model", str(bundle), "--quiet"]) == 1
    assert _one_error_line(capsys).startswith(f"edanb predict: error: {bundle / 'fold2' / 'best.pt'}: missing: the model is incomplete")
    (bundle / "fold2" / "best.pt").write_bytes(b"not a checkpoint")
    assert main(["predict", video, "--model", str(bundle), "--quiet"]) == 1
    assert _one_error_line(capsys).startswith(f"edanb predict: error: {bundle / 'fold2' / 'best.pt'}: cannot be loaded as weights")
    shutil.copyfile(trained["bvp_run"] / "fold2" / "best.pt", bundle / "fold2" / "best.pt")   # another model's weights
    assert main(["predict", video, "--model", str(bundle), "--quiet"]) == 1
    assert "does not fit the model 'seqcnn'" in _one_error_line(capsys)
    (bundle / "bundle.json").write_text("{")
    assert main(["predict", video, "--model", str(bundle), "--quiet"]) == 1
    assert _one_error_line(capsys).startswith(f"edanb predict: error: {bundle / 'bundle.json'}: not a valid bundle description")
    assert main(["predict", video, "--model", str(tmp_path / "nothing"), "--quiet"]) == 1
    assert "no such model folder" in _one_error_line(capsys)


def test_a_model_of_the_contact_bvp_is_refused(trained, capsys):
    assert main(["predict", str(_video(trained, "s1_T1")), "--model", str(trained["bvp_run"]), "--quiet"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"edanb predict: error: {trained['bvp_run']}: the model 'seqcnn_bvp' reads the contact BVP") and "--bvp-source video:pos" in line


def _ffmpeg(*args: str):
    import subprocess
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")   # installed by `make test` (dev requirements)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def test_a_variable_frame_rate_video_lands_on_the_clock_by_its_timestamps(trained, tmp_path):
    """Every third frame dropped, the others kept at their own times (H.264 in MP4, millisecond timestamps): each tick of
    the clock gets the kept frame nearest it, which placing frames by the nominal rate would not give."""
    from edanb.predict import predict_video
    from edanb.preprocess import frame_times, sample_frames
    source, video = _video(trained, "s2_T2"), tmp_path / "vfr.mp4"
    _ffmpeg("-i", str(source), "-vf", "select='not(eq(mod(n\\,3)\\,2))'", "-fps_mode", "passthrough", "-enc_time_base", "1/1000",
            "-video_track_timescale", "1000", "-c:v", "libx264", "-crf", "0", "-pix_fmt", "yuv444p", str(video))
    kept = np.array([j for j in range(int(cv2.VideoCapture(str(source)).get(cv2.CAP_PROP_FRAME_COUNT))) if j % 3 != 2])
    times = frame_times(video)
    assert len(times) == len(kept) and np.allclose(times, kept / 35, atol=1e-3), times[:6]
    n, index = sample_frames(times, cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS), 4.0)
    ticks = np.arange(n) / 4
    nearest = np.abs(kept[None, :] / 35 - ticks[:, None]).argmin(1)   # the kept frame nearest each tick, by its original time
    assert n == 47 and (index == nearest).all()   # the last kept frame, 418, starts at 11.94 s: 47 ticks of 4 Hz reach it
    table = predict_video(video, trained["bundle"], folds=[0])
    assert len(table) == n and np.isfinite(table.eda_change_us).all() and table.face.all()


def test_onnx_export_equals_torch(trained, tmp_path, capsys):
    import onnxruntime, torch
    from edanb.predict import example_inputs, fold_model, load_bundle
    out = tmp_path / "bundle"
    assert main(["export", str(trained["run"]), str(out), "--onnx"]) == 0
    assert "ONNX: 3 fold model(s)" in capsys.readouterr().out
    bundle = load_bundle(out)
    for fold in bundle.folds:
        (frames,) = example_inputs(bundle, ("frames",), 4, seed=fold + 10)
        session = onnxruntime.InferenceSession(str(out / f"fold{fold}" / "model.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad(): expected = fold_model(bundle, fold)({"frames": frames}).numpy()
        assert np.abs(session.run(None, {"frames": frames.numpy()})[0] - expected).max() < 1e-4
    assert json_of(out / "fold0" / "normaliser.json")["baselines"] == {}   # no recording's mean EDA travels with the model


def json_of(path: Path) -> dict:
    import json
    return json.loads(path.read_text())


def test_a_run_whose_cache_is_gone_predicts_with_the_preprocessing_it_trained_on(trained, tmp_path):
    from edanb.predict import load_bundle
    run = Path(shutil.copytree(trained["run"], tmp_path / "run"))
    config = json_of(run / "config.json")
    (run / "config.json").write_text(__import__("json").dumps({**config, "cache": str(tmp_path / "gone")}))
    bundle = load_bundle(run)
    assert bundle.preprocess == json_of(run / "provenance.json")["preprocessing"] and bundle.size == 32


@pytest.fixture(scope="module")
def frame_hz_run(small, tmp_path_factory) -> dict:
    "DeepPhys on a cache of 8 frames a second (2 per EDA sample, the whole frame), one epoch."
    from edanb.preprocess import PreprocessConfig, preprocess_dataset
    out = tmp_path_factory.mktemp("frame-hz")
    preprocess_dataset(small["data"], out / "cache", PreprocessConfig(size=16, crop="none", frame_hz=8), workers=2, progress=False)
    assert main(["train", "--data", small["data"], "--cache", str(out / "cache"), "--out", str(out / "run"), "--model", "deepphys",
                 "--folds", "3", "--epochs", "1", "--window", "16", "--no-progress"]) == 0
    return dict(small, run=out / "run")


def test_a_model_of_several_frames_per_sample_predicts_as_it_was_evaluated(frame_hz_run):
    from edanb.predict import predict_video
    tested = pd.read_parquet(frame_hz_run["run"] / "fold2" / "predictions.parquet").query("model == 'deepphys'")
    name = tested.recording.iat[0]
    table = predict_video(_video(frame_hz_run, name), frame_hz_run["run"], folds=[2])
    mine = tested[tested.recording == name]
    scale = json_of(frame_hz_run["run"] / "fold2" / "normaliser.json")["scale"]
    assert np.allclose(table.eda_change_us.to_numpy()[mine["sample"]], mine.pred * scale, atol=1e-5)
    assert table.face.isna().all()   # the whole frame: no detector ran


def test_a_video_slower_than_the_model_s_frames_is_refused(frame_hz_run, tmp_path, capsys):
    source, video = cv2.VideoCapture(str(_video(frame_hz_run, "s1_T1"))), tmp_path / "slow.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 6, (96, 96))
    for i in range(35 * 12):
        ok, frame = source.read()
        if i % 6 == 0: writer.write(frame)
    writer.release()
    assert main(["predict", str(video), "--model", str(frame_hz_run["run"]), "--quiet"]) == 1
    assert _one_error_line(capsys) == f"edanb predict: error: {video}: --frame-hz 8 is above the video's frame rate (6 fps)"


def test_an_h264_phone_video_is_read_and_cropped_like_the_original(trained, tmp_path):
    """The original re-encoded as a phone writes it: H.264 in MP4, 30 fps, 640x480 (letterboxed, the face 5x larger).
    OpenCV reads it, the face is found, and the crops the model reads follow the original's (their brightness over time).
    The trained models themselves are not that robust: see the README (a 1-epoch SeqCNN's trace correlates r ~0.4)."""
    from edanb.predict import load_bundle, predict_video, video_entry, video_recording
    source, video = _video(trained, "s4_T3"), tmp_path / "phone.mp4"
    _ffmpeg("-i", str(source), "-r", "30", "-vf", "scale=480:480,pad=640:480:80:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(video))
    rec = video_recording(video)
    assert (rec.width, rec.height, rec.fps) == (640, 480, 30.0)
    bundle, crops, boxes = load_bundle(trained["bundle"]), {}, {}
    for name, path in (("original", source), ("phone", video)):
        n, face, meta = video_entry(video_recording(path), bundle, tmp_path / name, False)
        crops[name] = np.load(tmp_path / name / "video_T1" / "frames.npy").astype(float)
        boxes[name] = np.load(tmp_path / name / "video_T1" / "boxes.npy").astype(float)
        assert n == 48 and face.mean() >= 0.9, (name, face.mean())
    # the crop windows as fractions of the picture (the phone's 480 px square starts at x = 80): the same face path
    apart = np.abs(boxes["original"] / 96 - (boxes["phone"] - [80, 0, 0]) / 480).mean(0)
    assert (apart < 0.1).all(), apart   # measured 0.01-0.08 of the picture on four recordings
    brightness = {name: frames.mean((1, 2, 3)) for name, frames in crops.items()}
    assert np.corrcoef(brightness["original"], brightness["phone"])[0, 1] > 0.7   # measured 0.80-0.97
    table = predict_video(video, bundle)
    assert len(table) == 48 and np.isfinite(table.eda_change_us).all()


def test_a_model_onnx_cannot_export_is_named_with_the_reason(trained, tmp_path, capsys, monkeypatch):
    import torch
    def unsupported(*args, **kwargs): raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset 17 is not supported.\nmore")
    monkeypatch.setattr(torch.onnx, "export", unsupported)
    assert main(["export", str(trained["run"]), str(tmp_path / "bundle"), "--onnx"]) == 1
    assert _one_error_line(capsys) == (f"edanb export: error: {tmp_path / 'bundle' / 'fold0' / 'model.onnx'}: the model 'seqcnn' cannot be "
                                       "exported to ONNX (RuntimeError: Exporting the operator 'aten::fancy' to ONNX opset 17 is not supported.)")
    assert (tmp_path / "bundle" / "bundle.json").exists()   # the bundle itself is kept


@pytest.mark.slow   # runs papermill
def test_the_prediction_notebook_shows_the_trace_and_the_frames_redacted(trained, tmp_path, capsys):
    from edanb.experiment import notebook_error
    from edanb.predict import load_prediction
    assert main(["predict", str(_video(trained, "s2_T2")), "--model", str(trained["bundle"]), "--folds", "0", "--out", str(tmp_path),
                 "--quiet", "--notebook"]) == 0
    assert f"notebook: {tmp_path / 'predict.ipynb'}" in capsys.readouterr().out
    executed = json_of(tmp_path / "predict.ipynb")
    assert notebook_error(tmp_path / "predict.ipynb") == "" and (tmp_path / "predict.html").stat().st_size > 10_000
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2   # the trace and the strip of frames
    injected = next("".join(c["source"]) for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "show_faces = False" in injected   # redacted unless --show-faces
    assert "EDA change from this video's own mean" in json.dumps(executed)
    table = load_prediction(tmp_path)
    assert table.attrs["folds"] == [0] and table.attrs["model"] == "seqcnn" and list(table.columns)[1] == "eda_change_us"
    assert Path(table.attrs["video"]).is_absolute() and Path(table.attrs["bundle"]).is_absolute()   # a notebook run elsewhere finds them
    assert main(["predict", str(_video(trained, "s2_T2")), "--model", str(trained["bundle"]), "--show-faces"]) == 1
    assert capsys.readouterr().err.strip() == "edanb predict: error: --show-faces is about the notebook's frames: add --notebook"


@pytest.mark.slow   # runs papermill
def test_a_failing_prediction_notebook_is_one_line_and_keeps_the_prediction(trained, tmp_path):
    from edanb.predict import predict_video, render_prediction, save_prediction
    out = save_prediction(predict_video(_video(trained, "s2_T2"), trained["bundle"], folds=[0]), tmp_path / "out")
    broken = tmp_path / "broken.ipynb"
    broken.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "prediction = ''",
                                             "outputs": [], "execution_count": None},
                                            {"cell_type": "code", "metadata": {}, "source": "raise ValueError('boom')", "outputs": [],
                                             "execution_count": None}],
                                  "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}},
                                  "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(RuntimeError, match="predict.ipynb: ValueError: boom"): render_prediction(out, broken)
    assert {"eda.csv", "eda.png", "prediction.json"} <= {p.name for p in out.iterdir()}
