"""edanb benchmarks (`make bench`): figures measured in one run and printed as ratios, never asserted as timed tests.

Real-sized synthetic recordings (1024x1024, 35 fps MJPEG; 180 s and 60 s) are generated once into data/bench and reused.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edanb.data import load_recording
from edanb.preprocess import (FrameReader, PreprocessConfig, crop_window, detect_face, frame_indices, reduction_for,
                              sample_count)
from edanb.synth import FaceRenderer, SynthConfig, affine, generate, make_subject, simulate_nuisance, stream

BENCH = Path("data/bench")


def render_fps(size: int, n: int = 100) -> float:
    subject = make_subject(0, 1)
    renderer = FaceRenderer(subject, size, stream(0, 1, 0, "appearance"))
    nuisance = simulate_nuisance(n, stream(0, 1, 1, "nuisance"))
    start = time.perf_counter()
    for i in range(n):
        renderer.frame(affine(subject, nuisance, i, size, 180), 0.5, 0.5, 0.1, float(nuisance.light[i]), i)
    return n / (time.perf_counter() - start)


def baseline_decode(rec, wanted: np.ndarray) -> float:
    "Seconds to decode every frame with VideoCapture.read() and keep the wanted ones (the common approach)."
    start, keep, cap, want = time.perf_counter(), [], cv2.VideoCapture(str(rec.video)), set(wanted.tolist())
    for i in range(rec.n_frames):
        ok, frame = cap.read()
        if not ok: break
        if i in want: keep.append(frame[::8, ::8].copy())  # keep a thumbnail: the point is the decoding
    cap.release()
    return time.perf_counter() - start


def edanb_decode(rec, wanted: np.ndarray, reduction: int) -> float:
    start = time.perf_counter()
    with FrameReader(rec.video) as reader:
        reader.reduction = reduction
        for i in wanted: reader.read(int(i))
    return time.perf_counter() - start


# this process's own peak resident memory (kB): /proc's VmHWM. Not ru_maxrss: Linux carries it across exec, so a child
# started by this (large) benchmark process would report at least this process's peak.
PEAK_KB = "[l.split()[1] for l in open('/proc/self/status').read().splitlines() if l.startswith('VmHWM')][0]"

def preprocess_cost(root: Path, cache: Path, frame_hz: float = 0.0, **config) -> tuple[float, float]:
    "Peak RSS (MB) and wall time (s) of a fresh process that preprocesses s1_T1 of `root` (face crops, landmarks unless `config` says otherwise)."
    settings = ", ".join(f"{k}={v!r}" for k, v in {"landmarks": True, "frame_hz": frame_hz, **config}.items())
    code = ("import resource, sys, time; from edanb.data import load_recording; "
            "from edanb.preprocess import PreprocessConfig, preprocess_recording; "
            f"rec = load_recording({str(root)!r}, 's1', 'T1'); start = time.perf_counter(); "
            f"preprocess_recording(rec, {str(cache)!r}, PreprocessConfig({settings})); "
            f"print(time.perf_counter() - start, {PEAK_KB})")
    import shutil; shutil.rmtree(cache, ignore_errors=True)
    seconds, rss = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-2:]
    return int(rss) / 1024, float(seconds)


def real_size_recordings() -> dict[int, Path]:
    "One subject at UBFC-Phys' size (1024 px), 60 s and 180 s per task (generated once)."
    roots = {s: BENCH / f"real-size-{s}s" for s in (60, 180)}
    for seconds, root in roots.items():
        generate(root, SynthConfig(subjects=1, seconds=seconds, size=1024), progress=False)
    return roots


def models():
    "Parameters and CPU forward time of every registered model (batch 8, T = 32, 72 px), both presets."
    import pandas as pd
    import torch
    from edanb.models import model_table
    print(f"\n== models: forward pass, batch 8 x T 32 x 72 px, CPU ({torch.get_num_threads()} threads), no grad")
    table = pd.concat([model_table(preset, batch=8, frames=32, size=72) for preset in ("tiny", "paper")])
    wide = table.pivot(index="model", columns="preset", values=["parameters", "forward_ms"]).loc[table.model.unique()]
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    wide = wide.astype({"parameters_paper": int, "parameters_tiny": int})
    wide["paper/tiny time"] = wide.forward_ms_paper / wide.forward_ms_tiny
    print(wide.round(1).to_string())


def preprocessing():
    print("== synthetic dataset generation (one core)")
    for size in (256, 1024):
        print(f"render {size}x{size}: {render_fps(size):.0f} frames/s")
    roots = real_size_recordings()

    rec = load_recording(roots[180], "s1", "T1")
    wanted = frame_indices(sample_count(rec), rec.fps)
    print(f"\n== decoding: {rec.video.name}, {rec.n_frames} frames 1024x1024, {len(wanted)} needed at 4 Hz")
    base = baseline_decode(rec, wanted)
    config = PreprocessConfig()
    detect_reduction = reduction_for(rec.width, config.detect_width)
    with FrameReader(rec.video) as reader:
        reader.reduction = detect_reduction
        box = detect_face(reader.read(0), detect_reduction, config)
    crop_side = crop_window(box, rec.width, rec.height, config.box_scale)[2]
    reduction = reduction_for(crop_side, config.size)
    detected = wanted[::config.detect_every]
    first = edanb_decode(rec, detected, detect_reduction)
    ours = edanb_decode(rec, wanted, reduction)
    print(f"baseline read() every frame: {len(wanted) / base:7.1f} sampled frames/s ({base:.1f} s)")
    print(f"edanb pass 1, the {len(detected)} detection frames at 1/{detect_reduction} JPEG decode: {first:.2f} s")
    print(f"edanb pass 2, all sampled frames at 1/{reduction} JPEG decode (crop {crop_side} px -> {config.size} px): "
          f"{len(wanted) / ours:7.1f} sampled frames/s ({ours:.2f} s)")
    print(f"speed-up, both passes: {base / (first + ours):.1f}x (target >= 10x); pass 2 alone: {base / ours:.1f}x")
    full = edanb_decode(rec, wanted, 1)
    print(f"edanb raw packets, full-scale decode: {len(wanted) / full:7.1f} sampled frames/s ({base / full:.1f}x)")

    print("\n== face detection (HOG, frame shrunk to detect_width)")
    with FrameReader(rec.video) as reader:
        reader.reduction = detect_reduction
        images = [reader.read(int(i)) for i in wanted[:40]]
    start = time.perf_counter()
    for image in images: detect_face(image, detect_reduction, config)
    per = (time.perf_counter() - start) / len(images)
    decode_per = (first + ours) / len(wanted)
    print(f"{per * 1e3:.1f} ms per detected frame vs {decode_per * 1e3:.2f} ms to decode a sampled frame (both passes); "
          f"detect_every={config.detect_every} -> detection is {per / config.detect_every / (per / config.detect_every + decode_per):.0%} "
          f"of per-frame time; detect_every=1 would be {(per + decode_per) / (per / config.detect_every + decode_per):.1f}x slower")

    print("\n== memory: peak RSS of preprocessing one recording (fresh process, face crops + landmarks)")
    rss = {s: preprocess_cost(root, BENCH / f"cache-{s}s")[0] for s, root in roots.items()}
    print(f"60 s: {rss[60]:.0f} MB, 180 s: {rss[180]:.0f} MB, ratio 180/60 = {rss[180] / rss[60]:.2f} "
          f"(target <= 1024 MB and within 10%)")
    meta = json.loads((BENCH / "cache-180s" / "s1_T1" / "meta.json").read_text())
    print(f"180 s recording: face_rate {meta['face_rate']:.3f}, fallback frames {meta['fallback']}, "
          f"JPEG decode scales 1/{', 1/'.join(map(str, meta['reductions']))}")


def training():
    "Train-step samples/s per model (tiny preset, CPU) against the loader's samples/s from the cache alone."
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader
    from edanb.dataset import DatasetConfig, make_datasets
    from edanb.metrics import make_loss
    from edanb.models import MODELS, create_model
    from edanb.preprocess import PreprocessConfig, preprocess_dataset
    root, cache = BENCH / "train-synth", BENCH / "train-cache"
    generate(root, SynthConfig(subjects=4, seconds=30, size=160), progress=False)
    preprocess_dataset(root, cache, PreprocessConfig(landmarks=True), workers=2, progress=False)
    split = dict(train=["s1", "s2"], val=["s3"], test=["s4"])
    batch_size = 16
    print(f"\n== training: batch {batch_size} x T 32 x 72 px, CPU ({torch.get_num_threads()} threads)")
    rates = {}
    for augment in (0.0, 0.7):
        train = make_datasets(cache, split, DatasetConfig(diff=True, landmarks=True, augment_p=augment))[0]["train"]
        for workers in (0, 2):
            loader = DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers)
            start, seen = time.perf_counter(), 0
            for batch in loader: seen += len(batch["eda"])
            rates[augment, workers] = seen / (time.perf_counter() - start)
    batch = next(iter(DataLoader(train, batch_size=batch_size, shuffle=True)))
    loss_fn, rows = make_loss("mse+npc"), []
    for name in MODELS:
        model = create_model(name, "tiny", size=72).train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
        def step():
            optimiser.zero_grad(); loss_fn(model(batch), batch["eda"]).backward(); optimiser.step()
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(3): step()
        rows.append(dict(model=name, step_samples_per_s=3 * batch_size / (time.perf_counter() - start)))
    table = pd.DataFrame(rows).set_index("model")
    print(table.round(1).to_string())
    slowest = table.step_samples_per_s.drop("naive").min()
    for (augment, workers), rate in rates.items():
        print(f"loader, augment p {augment}, {workers} workers: {rate:7.1f} samples/s = {rate / slowest:5.1f}x the slowest "
              f"model's training step ({table.step_samples_per_s.drop('naive').idxmin()}, {slowest:.1f} samples/s; target >= 5x)")


def frames():
    "Preprocessing one real-size recording at one frame per EDA sample and at --frame-hz 16: time, memory, frames kept."
    roots = real_size_recordings()
    print("\n== frames above the EDA clock: preprocessing s1_T1 at 1024x1024 (fresh process, face crops + landmarks)")
    rows = {}
    for frame_hz in (0.0, 16.0):
        for seconds, root in roots.items():
            rows[frame_hz, seconds] = preprocess_cost(root, BENCH / f"cache-{seconds}s-{frame_hz:g}fps", frame_hz)   # with landmarks
            print(f"{frame_hz or 4:g} frames/s, {seconds} s: {rows[frame_hz, seconds][1]:.1f} s, peak {rows[frame_hz, seconds][0]:.0f} MB")
    for seconds in roots:
        print(f"{seconds} s recording: 16 vs 4 frames/s costs {rows[16.0, seconds][1] / rows[0.0, seconds][1]:.2f}x the time "
              f"and {rows[16.0, seconds][0] / rows[0.0, seconds][0]:.2f}x the peak memory")
    print(f"16 frames/s, 180 s vs 60 s: peak memory ratio {rows[16.0, 180][0] / rows[16.0, 60][0]:.2f} (flat in the length: ~1)")


def whole_process(root: Path, *options: str) -> tuple[float, float]:
    "Wall and CPU time (s) of `edanb preprocess ROOT` into a fresh cache, as a user runs it (its imports and threads included)."
    import resource, shutil
    cache = BENCH / "cache-whole"
    shutil.rmtree(cache, ignore_errors=True)
    cpu = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    start, start_cpu = time.perf_counter(), cpu()
    subprocess.run([str(Path(sys.executable).parent / "edanb"), "preprocess", str(root), "--out", str(cache), "--quiet", *options],
                   check=True, capture_output=True)
    return time.perf_counter() - start, cpu() - start_cpu


def pulse():
    "The camera pulse's trace (--pulse) at 1024x1024, 35 fps, 3 x 120 s: whole-process preprocessing with and without it against decoding every frame; rPPG throughput; the heart rate's error."
    from edanb.data import scan
    from edanb.preprocess import preprocess_dataset
    from edanb.pulse import RPPG_METHODS, evaluate_pulse, pulse_table, rppg
    root = BENCH / "real-size-120s"
    generate(root, SynthConfig(subjects=1, seconds=120, size=1024), progress=False)
    recordings, _ = scan(root)
    start = time.perf_counter()
    for rec in recordings: baseline_decode(rec, frame_indices(sample_count(rec), rec.fps))
    base = time.perf_counter() - start
    frames = sum(r.n_frames for r in recordings)
    print(f"\n== camera pulse: {len(recordings)} recordings at 1024x1024, 35 fps, 120 s; whole process (`edanb preprocess`, imports included)")
    print(f"baseline read() every frame: {base:.1f} s ({base / frames * 1e3:.2f} ms a frame)")
    times = {}
    for crop in ("none", "face"):
        for workers in ("1", "2"):
            for trace in ((), ("--pulse",)):
                seconds, cpu = whole_process(root, "--crop", crop, "--workers", workers, *trace)
                times[crop, workers, bool(trace)] = seconds
                print(f"--crop {crop} --workers {workers} {' '.join(trace):8s}: {seconds:5.1f} s ({cpu:4.1f} CPU-s), "
                      f"{base / seconds:4.1f}x faster than the baseline")
            print(f"   the trace costs {times[crop, workers, True] / times[crop, workers, False] - 1:.0%} more (target <= 100%)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import edanb.cli"], check=True)
    print(f"importing edanb.cli in a new process: {time.perf_counter() - start:.2f} s")
    preprocess_dataset(root, BENCH / "cache-pulse", PreprocessConfig(pulse=True), workers=2, progress=False)   # kept: reused by a rerun
    meta = json.loads((BENCH / "cache-pulse" / "s1_T1" / "meta.json").read_text())
    rgb = np.load(BENCH / "cache-pulse" / "s1_T1" / "rgb.npy")
    print(f"trace: {meta['trace_samples']} frames at {meta['trace_hz']:g} Hz per recording, {meta['trace_missing']} missing")
    for method in RPPG_METHODS:
        start = time.perf_counter()
        for _ in range(5): rppg(rgb, meta["trace_hz"], method)
        print(f"rPPG {method}: {5 * len(rgb) / (time.perf_counter() - start):,.0f} trace frames/s")
    windows, _ = evaluate_pulse(root, BENCH / "cache-pulse", progress=False)
    print("heart rate over 30 s windows (1 s steps) against the contact BVP:")
    print(pulse_table(windows, n_boot=200)[["method", "windows", "mae", "rmse", "mape", "r", "snr"]].round(2).to_string(index=False))


def predict():
    "edanb predict on a 3-minute 1024x1024 35 fps MJPEG recording and on the same clip as 720p H.264: seconds of video per second of compute."
    import shutil, resource
    from edanb.cli import main as edanb
    from edanb.predict import load_bundle, predict_video
    video = real_size_recordings()[180] / "s1" / "vid_s1_T2.avi"
    train = BENCH / "predict-model"
    if not (train / "run" / "done.json").exists():   # a tiny SeqCNN, one epoch: the speed does not depend on what it learned
        shutil.rmtree(train, ignore_errors=True)
        generate(train / "ubfc", SynthConfig(subjects=6, seconds=12, size=192), progress=False)
        from edanb.preprocess import preprocess_dataset
        preprocess_dataset(train / "ubfc", train / "cache", PreprocessConfig(), workers=2, progress=False)
        edanb(["train", "--data", str(train / "ubfc"), "--cache", str(train / "cache"), "--out", str(train / "run"), "--model", "seqcnn",
               "--preset", "tiny", "--folds", "3", "--epochs", "1", "--no-progress"])
    h264 = BENCH / "predict-720p.mp4"
    if not h264.exists():
        import imageio_ffmpeg
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video), "-vf",
                        "scale=720:720,pad=1280:720:280:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(h264)], check=True)
    bundle = load_bundle(train / "run")
    print(f"\n== predict: the tiny SeqCNN, 3 fold models averaged, CPU ({resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB so far)")
    for label, path in (("1024x1024 MJPEG", video), ("1280x720 H.264", h264)):
        start, cpu = time.perf_counter(), time.process_time()
        table = predict_video(path, bundle, device="cpu")
        seconds, used = time.perf_counter() - start, time.process_time() - cpu
        length = len(table) / 4
        print(f"{label:16s}: {length:.0f} s of video in {seconds:5.1f} s ({used:5.1f} CPU-s): {length / seconds:5.1f}x real time "
              f"(goal for MJPEG: >= 10x); face in {table.attrs['face_rate']:.0%} of detection attempts")
    rss = {}
    for seconds, root in real_size_recordings().items():   # peak memory of a fresh process: flat in the video's length?
        code = ("from edanb.predict import predict_video; "
                f"predict_video({str(root / 's1' / 'vid_s1_T2.avi')!r}, {str(train / 'run')!r}, device='cpu'); print({PEAK_KB})")
        rss[seconds] = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024
    print(f"peak memory of a fresh process: {rss[60]:.0f} MB for 60 s, {rss[180]:.0f} MB for 180 s (ratio {rss[180] / rss[60]:.2f}; flat: ~1)")


SECTIONS = dict(preprocessing=preprocessing, models=models, training=training, frames=frames, pulse=pulse, predict=predict)

def main(names: list[str]) -> int:
    "Run the named sections (all by default): `python bench/run.py models`."
    unknown = set(names) - set(SECTIONS)
    if unknown: sys.exit(f"unknown benchmark section(s) {sorted(unknown)}: choose from {list(SECTIONS)}")
    for name in names or SECTIONS: SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
