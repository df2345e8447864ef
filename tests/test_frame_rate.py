"More frames than EDA samples (edanb preprocess --frame-hz): the cache, the clips, the models on the EDA clock, bad rates."
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_dataset
from edanb.data import save_split
from edanb.dataset import DatasetConfig, make_datasets
from edanb.preprocess import PreprocessConfig, frame_indices, load_cached, preprocess_dataset
from edanb.train import TrainConfig, fit

BIN = Path(sys.executable).parent
SPLIT = dict(train=["s1"], val=["s2"], test=["s3"])


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    "Three subjects, 6 s, 64 px (35 fps video, EDA at 4 Hz)."
    return make_dataset(tmp_path_factory, "three", subjects=3, seconds=6, size=64, world="simple")


@pytest.fixture(scope="module")
def fast_cache(three, tmp_path_factory) -> tuple[Path, Path]:
    "The dataset cached at one frame per EDA sample and at 16 frames a second."
    out = tmp_path_factory.mktemp("frames")
    for name, frame_hz in (("slow", 0.0), ("fast", 16.0)):
        table = preprocess_dataset(three, out / name, PreprocessConfig(size=16, frame_hz=frame_hz, crop="none"), workers=2,
                                   progress=False)   # 64 px faces: too small for the detector
        assert (table.status == "built").all(), table
    return out / "slow", out / "fast"


def test_the_cache_holds_k_frames_per_sample_centred_on_it(fast_cache):
    slow, fast = (load_cached(c, "s1_T2") for c in fast_cache)
    n = slow["meta"]["samples"]
    assert fast["meta"]["samples"] == n and fast["meta"]["frames_per_sample"] == 4 and fast["meta"]["frame_hz"] == 16
    assert fast["frames"].shape == (4 * n, 16, 16, 3) and fast["boxes"].shape == (4 * n, 3)
    np.testing.assert_array_equal(fast["eda"], slow["eda"])                       # the signals stay on the EDA clock
    times = fast["frame_index"].reshape(n, 4) / 35.0
    assert np.abs(times[1:-1].mean(1) - np.arange(1, n - 1) / 4).max() < 0.5 / 35 + 1e-9   # centred on each sample
    np.testing.assert_array_equal(frame_indices(n, 35.0), slow["frame_index"])     # one per sample: as before


def test_a_clip_has_k_frames_per_sample_and_its_targets_on_the_eda_clock(fast_cache):
    slow, fast = fast_cache
    config = DatasetConfig(window=8, stride=4, augment_p=0, diff=True, frame_scaling="unit")
    (d1, _), (d4, _) = make_datasets(slow, SPLIT, config), make_datasets(fast, SPLIT, config)
    assert len(d1["train"]) == len(d4["train"]) and d4["train"].per_sample == 4
    i = int(np.flatnonzero(d4["test"].clips.start.to_numpy() > 0)[1])   # a clip inside its recording
    a, b = d1["test"][i], d4["test"][i]
    assert b["frames"].shape == (32, 3, 16, 16) and b["diff"].shape == (32, 3, 16, 16)
    torch.testing.assert_close(a["eda"], b["eda"]); assert a["start"] == b["start"]
    frames = load_cached(fast, b["recording"])["frames"]
    start = b["start"]
    np.testing.assert_allclose(b["frames"].permute(0, 2, 3, 1).numpy() * 255, frames[4 * start:4 * start + 32], atol=1e-3)


def test_a_video_model_trains_on_the_fast_cache_and_predicts_on_the_eda_clock(fast_cache, three, tmp_path):
    _, fast = fast_cache
    split = save_split(SPLIT, tmp_path / "split.json")
    fit(TrainConfig(data=str(three), cache=str(fast), out=str(tmp_path / "run"), model="physnet", window=8, stride=4,
                    batch_size=4, epochs=1, split=str(split), progress=False, augment_p=0, model_args='{"use_bvp": true}'))
    samples = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    mine = samples[samples.model == "physnet"]
    assert len(mine) == 3 * load_cached(fast, "s3_T1")["meta"]["samples"]                 # every test sample, once
    assert np.isfinite(mine.pred).all() and mine.pred.std() > 0
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["preprocessing"]["frame_hz"] == 16.0                                  # the run says what it read


@pytest.mark.parametrize("rate, message", [("10", "--frame-hz 10: must be a whole multiple of the EDA clock (4 Hz)"),
                                           ("64", "--frame-hz 64 is above the video frame rate")])
def test_a_frame_rate_the_clock_or_the_video_cannot_give_is_one_line(three, tmp_path, rate, message):
    done = subprocess.run([str(BIN / "edanb"), "preprocess", str(three), "--out", str(tmp_path / "c"), "--frame-hz", rate],
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr
    assert not any((tmp_path / "c").glob("s*"))
