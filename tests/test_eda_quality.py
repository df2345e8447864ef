"Implausible EDA samples (motion spikes, dropouts): flagged in the cache, never trained on or scored under eda_quality='mask'."
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edanb.config import TrainConfig
from edanb.data import eda_quality, read_signal, recording_paths
from edanb.dataset import DatasetConfig, make_datasets
from edanb.metrics import metrics_table, predictions_table, series_metrics
from edanb.preprocess import PreprocessConfig, load_cached, preprocess_dataset
from edanb.synth import SynthConfig, generate
from edanb.train import fit

SPLIT = dict(train=["s1", "s2"], val=["s3"], test=["s4"])


@pytest.fixture(scope="module")
def spiky(tmp_path_factory) -> tuple[Path, Path]:
    "A rich world with many artefacts (6 a minute): 4 subjects, 30 s, 48 px, cached at 32 px."
    root = tmp_path_factory.mktemp("spiky")
    generate(root / "ubfc", SynthConfig(subjects=4, seconds=30, size=48, world="rich", artefacts_per_min=6), progress=False)
    preprocess_dataset(root / "ubfc", root / "cache", PreprocessConfig(size=32, crop="none"), workers=2, progress=False)   # 48 px faces: too small for the detector
    return root / "ubfc", root / "cache"


def test_the_cache_records_the_flags_of_the_recorded_eda(spiky):
    root, cache = spiky
    total = 0
    for name in ("s1_T1", "s2_T2", "s4_T3"):
        entry = load_cached(cache, name)
        raw = read_signal(recording_paths(root, *name.split("_"))["eda"])
        np.testing.assert_array_equal(entry["eda_flagged"], eda_quality(raw)[:entry["meta"]["samples"]])
        assert entry["meta"]["eda_flagged"] == int(entry["eda_flagged"].sum())
        total += entry["meta"]["eda_flagged"]
    assert total > 0


def test_mask_keeps_flagged_samples_out_of_training_clips_and_scalings(spiky):
    _, cache = spiky
    masked, norm = make_datasets(cache, SPLIT, DatasetConfig(window=16, stride=4, augment_p=0, eda_quality="mask"))
    kept, kept_norm = make_datasets(cache, SPLIT, DatasetConfig(window=16, stride=4, augment_p=0, eda_quality="keep"))
    train = masked["train"]
    for name, start in zip(train.clips.recording, train.clips.start):
        assert not train.flagged[name][start:start + 16].any()
    assert len(train) < len(kept["train"])                                   # the flagged clips are gone ...
    assert len(masked["test"]) == len(kept["test"])                          # ... from training only: scoring masks samples
    assert all(not f.any() for f in kept["train"].flagged.values())
    for name, flagged in train.flagged.items():                              # flagged samples bridged in the targets
        if flagged.any():
            raw = load_cached(cache, name)["eda"]
            assert np.abs(norm.inverse(train.targets[name], name) - raw)[flagged].max() > 1.0   # a 3-8 µS spike is gone
            np.testing.assert_allclose(norm.inverse(train.targets[name], name)[~flagged], raw[~flagged], atol=1e-4)


def test_scoring_leaves_flagged_samples_out_of_every_metric():
    rng = np.random.default_rng(0)
    target = np.sin(np.arange(120) / 6)
    pred = target + rng.normal(0, 0.1, 120)
    spiked, flagged = target.copy(), np.zeros(120, bool)
    spiked[50:53], flagged[50:53] = 8.0, True
    starts = np.arange(0, 120 - 16 + 1, 8)
    clips = np.stack([pred[s:s + 16] for s in starts])
    names = ["s1_T2"] * len(starts)
    clean = predictions_table(names, starts, clips, {"s1_T2": target})
    masked = predictions_table(names, starts, clips, {"s1_T2": spiked}, flagged={"s1_T2": flagged})
    kept = predictions_table(names, starts, clips, {"s1_T2": spiked})
    m, k = series_metrics(masked), series_metrics(kept)
    assert m["n"] == 117 and k["n"] == 120
    assert m["mse"] == pytest.approx(series_metrics(clean[~flagged]).get("mse"))
    assert m["r"] > 0.95 > k["r"]                                    # the spike costs r only when it is kept
    assert m["r_lag"] >= m["r"] and abs(m["lag_s"]) <= 0.5
    assert m["clip_r"] > k["clip_r"]
    assert metrics_table(masked).r.iat[0] == pytest.approx(m["r"])


def test_a_run_records_its_eda_quality_and_scores_without_the_flagged_samples(spiky, tmp_path):
    root, cache = spiky
    fit(TrainConfig(data=str(root), cache=str(cache), out=str(tmp_path / "run"), model="seqcnn", window=16, stride=8,
                    batch_size=8, epochs=1, folds=4, progress=False, augment_p=0))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eda_quality"] == "mask"
    samples = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    flagged = {name: int(load_cached(cache, name)["eda_flagged"].sum()) for name in samples.recording.unique()}
    assert sum(flagged.values()) > 0
    for (model, name), rows in samples.groupby(["model", "recording"]):    # the model's and every reference's rows
        assert rows.flagged.sum() == flagged[name], (model, name)
    per_recording = pd.DataFrame(json.loads((tmp_path / "run" / "metrics.json").read_text())["per_recording"])
    counted = per_recording.set_index(["model", "recording"]).n
    assert all(counted[(m, r)] == len(rows) - flagged[r] for (m, r), rows in samples.groupby(["model", "recording"]))
    with pytest.raises(ValueError, match="eda_quality"): TrainConfig(eda_quality="drop")


def test_the_references_are_fitted_on_clean_training_samples_only(spiky):
    "A flagged training sample moves no reference: naive, the elapsed-time lines, the task profile, BVP-only, the oracle."
    from edanb.metrics import reference_predictions
    root, cache = spiky
    datasets, norm = make_datasets(cache, SPLIT, DatasetConfig(window=16, stride=4, augment_p=0))
    before = pd.concat(reference_predictions(datasets, norm, 16, 4, root, cache))
    train = datasets["train"]
    assert any(f.any() for f in train.flagged.values())
    for name, flagged in train.flagged.items(): train.targets[name][flagged] += 1000.0   # what a bridged sample holds: ignored
    after = pd.concat(reference_predictions(datasets, norm, 16, 4, root, cache))
    assert set(before.model) == {"naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "oracle"}
    np.testing.assert_allclose(after.pred.to_numpy(), before.pred.to_numpy(), atol=1e-9)
