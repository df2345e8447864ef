"""edanb benchmarks (`make bench`): figures measured in one run and printed as ratios, never asserted as timed tests.

Real-sized recordings are generated once into data/bench and reused.
"""
import resource
import sys
import time
from pathlib import Path

from edanb.data import probe_video, recording_paths
from edanb.synth import SynthConfig, generate, make_subject, stream, FaceRenderer, affine, simulate_nuisance

BENCH = Path("data/bench")


def timed(fn, *args, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter(); fn(*args); best = min(best, time.perf_counter() - start)
    return best


def render_fps(size: int, n: int = 200) -> float:
    subject = make_subject(0, 1)
    renderer = FaceRenderer(subject, size, stream(0, 1, 0, "appearance"))
    nuisance = simulate_nuisance(n, stream(0, 1, 1, "nuisance"))
    start = time.perf_counter()
    for i in range(n):
        renderer.frame(affine(subject, nuisance, i, size, 180), 0.5, 0.5, 0.1, float(nuisance.light[i]), i)
    return n / (time.perf_counter() - start)


def main():
    print("== synthetic dataset")
    for size in (256, 1024):
        print(f"render only, {size}x{size}: {render_fps(size):.0f} frames/s (one core)")
    for seconds in (60, 180):
        generate(BENCH / f"real-size-{seconds}s", SynthConfig(subjects=1, seconds=seconds, size=1024), progress=False)
    print("== validation cost does not grow with video length (probe decodes 2 frames)")
    probe = {s: timed(probe_video, recording_paths(BENCH / f"real-size-{s}s", "s1", "T1")["video"]) for s in (60, 180)}
    print(f"probe 1024x1024 60 s: {probe[60] * 1e3:.1f} ms, 180 s: {probe[180] * 1e3:.1f} ms, "
          f"ratio 180/60 = {probe[180] / probe[60]:.2f} (3.00 would mean linear in length)")
    print(f"peak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
