"Windows, train-only normalisation, clip-consistent augmentation and the split guard on the synthetic dataset."
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from edanb.data import DataError, SplitError, save_split
from edanb.dataset import (ClipAugment, ClipDataset, DatasetConfig, Normaliser, cached_recordings, make_datasets,
                           reflect_index, split_recordings)
from edanb.preprocess import load_cached
from conftest import edit_cached

SPLIT = dict(train=["s1", "s2", "s3", "s4"], val=["s5"], test=["s6"])


def test_no_clip_spans_two_recordings(synth_cache):
    datasets, _ = make_datasets(synth_cache, SPLIT, DatasetConfig(window=32, stride=7, augment_p=0))
    for part, ds in datasets.items():
        stride = 7 if part == "train" else 4      # evaluation: the largest stride <= 7 that divides the window
        for name, n in ((name, len(t)) for name, t in ds.targets.items()):
            expected = (n - 32) // 7 + 1 if part == "train" else len(range(-(32 - 4), n, 4))
            assert (ds.clips.recording == name).sum() == expected
        for i in range(len(ds)):  # every clip's samples come from its own recording, mirrored at its ends
            item = ds[i]
            truth = load_cached(synth_cache, item["recording"])
            n, start = len(truth["eda"]), item["start"]
            assert part != "train" or 0 <= start and start + 32 <= n
            np.testing.assert_allclose(ds.normaliser.inverse(item["eda"].numpy(), item["recording"]),
                                       truth["eda"][reflect_index(np.arange(start, start + 32), n)], rtol=1e-5)
            assert item["recording"].startswith(item["subject"] + "_")
            assert item["subject"] in SPLIT[part]


def test_evaluation_clips_cover_every_sample_equally(synth_cache):
    "Each test sample is seen by window / stride clips, at the same within-clip positions as its neighbours: no edge is special."
    datasets, _ = make_datasets(synth_cache, SPLIT, DatasetConfig(window=32, stride=8))
    test = datasets["test"]
    for name, target in test.targets.items():
        starts = test.clips.start[test.clips.recording == name].to_numpy()
        for i in range(len(target)):
            positions = np.sort(i - starts[(starts <= i) & (i < starts + 32)])
            np.testing.assert_array_equal(positions, (i + 24) % 8 + 8 * np.arange(4), err_msg=f"{name} sample {i}")


def test_normaliser_sees_training_data_only(synth_cache, tmp_path):
    _, before = make_datasets(synth_cache, SPLIT)
    changed = shutil.copytree(synth_cache, tmp_path / "cache")
    for name in ("s5_T1", "s6_T2", "s6_T3"):   # val and test recordings: new labels and new pixels
        edit_cached(changed / name, "eda", np.load(changed / name / "eda.npy") * 10 + 3)
        edit_cached(changed / name, "frames", 255 - np.load(changed / name / "frames.npy"))
    standard = DatasetConfig(eda_scaling="zscore", frame_scaling="standard")  # one training centre: no centre from test labels
    datasets, after = make_datasets(changed, SPLIT, standard)
    _, before_std = make_datasets(synth_cache, SPLIT, standard)
    assert after == before_std and before.train_recordings == after.train_recordings
    assert all(name.split("_")[0] in SPLIT["train"] for name in after.train_recordings)
    # and the change does reach the test data, so the comparison above could fail
    assert not np.allclose(datasets["test"].targets["s6_T2"], make_datasets(synth_cache, SPLIT)[0]["test"].targets["s6_T2"])


@pytest.mark.parametrize("kind", ["recording", "subject", "zscore", "minmax"])
def test_normaliser_round_trip_to_microsiemens(synth_cache, tmp_path, kind):
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(eda_scaling=kind))
    loaded = Normaliser.load(norm.save(tmp_path / "normaliser.json"))
    assert loaded == norm
    for name, target in datasets["test"].targets.items():
        eda = load_cached(synth_cache, name)["eda"].astype(np.float64)
        np.testing.assert_allclose(loaded.inverse(loaded.transform(eda, name), name), eda, rtol=0, atol=1e-12)
        np.testing.assert_allclose(loaded.inverse(target, name), eda, rtol=1e-6)
    if kind == "minmax":
        train = np.concatenate([datasets["train"].targets[n] for n in norm.train_recordings])
        assert train.min() == pytest.approx(0, abs=1e-6) and train.max() == pytest.approx(1, abs=1e-6)


def test_bad_normaliser_file_is_named(tmp_path):
    (tmp_path / "normaliser.json").write_text("{not json")
    with pytest.raises(DataError, match="normaliser.json"): Normaliser.load(tmp_path / "normaliser.json")


def test_augmentation_is_one_draw_per_clip(synth_cache):
    norm = make_datasets(synth_cache, SPLIT)[1]
    plain = ClipDataset(synth_cache, ["s1_T2"], norm, window=16, stride=16)
    frames = torch.from_numpy(np.array(plain.frames_of("s1_T2")[:1])).permute(0, 3, 1, 2).repeat(16, 1, 1, 1)
    torch.manual_seed(0)
    for _ in range(10):   # a still clip stays still: every frame got the same rotation, warp, flip and jitter
        out, _ = ClipAugment(p=1.0)(frames)
        assert all(torch.equal(out[0], f) for f in out[1:]) and not torch.equal(out, frames)


def test_augmentation_probability_and_parts(synth_cache):
    torch.manual_seed(0)
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(augment_p=0.7))
    assert datasets["train"].augment is not None and datasets["train"].augment.p == 0.7
    assert datasets["val"].augment is None and datasets["test"].augment is None
    names = datasets["train"].clips.recording.unique().tolist()
    plain = ClipDataset(synth_cache, names, norm)
    never = ClipDataset(synth_cache, names, norm, augment=ClipAugment(p=0.0))
    always = ClipDataset(synth_cache, names, norm, augment=ClipAugment(p=1.0))
    for i in range(0, len(plain), 5):
        assert torch.equal(never[i]["frames"], plain[i]["frames"])
        assert not torch.equal(always[i]["frames"], plain[i]["frames"])
    changed = np.mean([not torch.equal(datasets["train"][i]["frames"], plain[i]["frames"]) for i in range(len(plain))])
    assert 0.55 < changed < 0.85   # p = 0.7
    test = datasets["test"]
    fresh = ClipDataset(synth_cache, test.clips.recording.unique().tolist(), norm, pad=True)
    for i in range(len(test)): assert torch.equal(test[i]["frames"], fresh[i]["frames"])


def test_landmarks_follow_the_clip(synth_cache):
    torch.manual_seed(1)
    ds, _ = make_datasets(synth_cache, SPLIT, DatasetConfig(landmarks=True, diff=True, augment_p=1.0))
    item = ds["train"][3]
    assert item["landmarks"].shape == (32, 68, 2) and item["diff"].shape == item["frames"].shape
    assert torch.isfinite(item["diff"]).all()
    marks = item["landmarks"][~item["landmarks"].isnan().any(-1)]
    assert len(marks) and marks.min() > -0.5 and marks.max() < 1.5


def test_dataloader_with_workers(synth_cache):
    datasets, _ = make_datasets(synth_cache, SPLIT, DatasetConfig(window=16, stride=16))
    loader = DataLoader(datasets["val"], batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b["recording"]) for b in batches) == len(datasets["val"])
    assert batches[0]["frames"].shape == (4, 16, 3, 72, 72) and batches[0]["frames"].dtype == torch.float32


def test_split_guard_and_missing_subjects(synth_cache, tmp_path):
    with pytest.raises(SplitError, match="s2"):
        make_datasets(synth_cache, dict(train=["s1", "s2"], val=["s2"], test=["s3"]))
    with pytest.raises(DataError, match=r"subjects \['s9'\]") as err:
        make_datasets(synth_cache, dict(train=["s1", "s2"], val=["s9"], test=["s3"]))
    assert str(synth_cache) in str(err.value)
    path = save_split(SPLIT, tmp_path / "split.json")
    datasets, _ = make_datasets(synth_cache, path)
    assert set(datasets["test"].clips.recording.str.split("_").str[0]) == {"s6"}
    parts = split_recordings(synth_cache, SPLIT, tasks=["T2"])
    assert parts["val"] == ["s5_T2"]


def test_bad_cache_inputs_are_named(tiny_root, tmp_path):
    from edanb.preprocess import PreprocessConfig, preprocess_dataset
    with pytest.raises(DataError, match="no such cache folder"): cached_recordings(tmp_path / "nowhere")
    cache = tmp_path / "cache"
    preprocess_dataset(tiny_root, cache, PreprocessConfig(size=32, crop="none"), workers=1, progress=False)
    norm = Normaliser()
    with pytest.raises(DataError, match="s1_T1.*landmarks"): ClipDataset(cache, ["s1_T1"], norm, landmarks=True)
    with pytest.raises(DataError, match="s1_T9"): ClipDataset(cache, ["s1_T9"], norm)
    assert len(ClipDataset(cache, ["s1_T1"], norm, window=64)) == 0   # 16 samples: too short for one clip of 64
