"Losses and metrics against scipy and hand-computed values; stitching, bootstrap, baseline test, oracle."
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from edanb.dataset import DatasetConfig, make_datasets, split_recordings
from edanb.metrics import (bootstrap_ci, ccc, compare_to_baseline, make_loss, metrics_table, oracle_fraction,
                           oracle_predictions, pearson_per_clip, predictions_table, series_table, summarise)

SPLIT = dict(train=["s1", "s2", "s3", "s4"], val=["s5"], test=["s6"])


def test_losses_against_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))
    r = [scipy.stats.pearsonr(p, t).statistic for p, t in zip(pred, target)]
    np.testing.assert_allclose(pearson_per_clip(torch.tensor(pred), torch.tensor(target)), r, atol=1e-5)
    assert make_loss("npc")(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(-np.mean(r), abs=1e-5)
    assert make_loss("mse")(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(np.mean((pred - target) ** 2))
    lin = [ccc(p, t) for p, t in zip(pred, target)]
    assert make_loss("ccc")(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(1 - np.mean(lin), abs=1e-5)


def test_npc_perfect_and_flat():
    y = torch.randn(4, 32)
    assert make_loss("npc")(y, y).item() == pytest.approx(-1, abs=1e-4)
    flat = torch.full_like(y, 0.3, requires_grad=True)
    loss = make_loss("mse+npc")(flat, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flat.grad).all()


def test_ccc_by_hand():
    p, t = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 8])
    cov = np.mean((p - p.mean()) * (t - t.mean()))
    assert ccc(p, t) == pytest.approx(2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2))


def test_stitching_identity_over_the_test_set(synth_cache):
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(window=32, stride=12, eda_scaling="zscore"))
    test = datasets["test"]
    clips = np.stack([test[i]["eda"].numpy() for i in range(len(test))])
    table = predictions_table(test.clips.recording, test.clips.start, clips, test.targets, norm)
    assert len(table) == sum(len(t) for t in test.targets.values())       # every sample covered once
    np.testing.assert_allclose(table.pred, table.target, atol=1e-6)
    np.testing.assert_allclose(table.pred_us, table.target_us, atol=1e-5)
    rec = metrics_table(table)
    assert (rec.mse < 1e-10).all() and np.allclose(rec.r, 1)


def test_train_mean_prediction_has_nan_r_and_finite_errors(synth_cache):
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(eda_scaling="zscore"))
    test = datasets["test"]
    naive = predictions_table(test.clips.recording, test.clips.start, np.zeros((len(test), 32)), test.targets, norm)
    rec = metrics_table(naive)
    assert rec.r.isna().all() and rec.npc.isna().all() and np.isfinite(rec.mse_us).all()
    assert np.allclose(naive.pred_us, norm.centre)        # the training mean, in µS
    summary = summarise(metrics_table(naive, "subject"))
    assert summary.set_index("metric").loc["r", "subjects"] == 0


def test_bootstrap_interval_covers_known_mean():
    rng = np.random.default_rng(7)
    hits = [lo <= 2.0 <= hi for lo, hi in (bootstrap_ci(rng.exponential(2.0, 30), 1000, seed=i)[1:] for i in range(200))]
    assert 0.85 <= np.mean(hits) <= 0.99
    mean, lo, hi = bootstrap_ci(np.arange(10.0))
    assert mean == 4.5 and lo < mean < hi


def test_compare_to_baseline_by_subject():
    subjects = pd.DataFrame(dict(model=["naive"] * 6 + ["m"] * 6, subject=[f"s{i}" for i in range(6)] * 2,
                                 mse_us=[1, 2, 3, 4, 5, 6, 1.5, 1, 3.5, 3, 4, 5.5]))
    row = compare_to_baseline(subjects).iloc[0]
    diff = np.array([0.5, -1, 0.5, -1, -1, -0.5])
    assert row.p_value == pytest.approx(scipy.stats.wilcoxon(diff).pvalue)
    assert row.better_in == 4 and row.subjects == 6 and row.smallest_possible_p == pytest.approx(1 / 32)
    with pytest.raises(ValueError, match="baseline 'mean'"): compare_to_baseline(subjects, baseline="mean")


@pytest.mark.parametrize("scaling", ["recording", "subject"])
def test_the_oracle_is_centred_as_the_targets_are(synth_root, synth_cache, scaling):
    "Each recording's cues centred on the recording (or its subject's rest task), as the targets are: a ceiling near 1."
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(eda_scaling=scaling))
    oracle = oracle_predictions(synth_root, synth_cache, split_recordings(synth_cache, SPLIT), norm)
    assert metrics_table(oracle, "subject").r.iat[0] > 0.9


def test_oracle_on_synthetic_and_null_data(synth_root, synth_cache):
    datasets, norm = make_datasets(synth_cache, SPLIT)
    parts = split_recordings(synth_cache, SPLIT)
    oracle = oracle_predictions(synth_root, synth_cache, parts, norm)
    test = datasets["test"]
    noisy = series_table("s6_T1", test.targets["s6_T1"] + np.random.default_rng(0).normal(0, 1, len(test.targets["s6_T1"])),
                         test.targets["s6_T1"], norm)
    subjects = metrics_table(pd.concat([oracle, noisy.assign(model="noisy")]), "subject")
    assert subjects.set_index("model").loc["oracle", "r"] > 0.7
    frac = oracle_fraction(subjects).set_index("model")
    assert frac.loc["oracle", "fraction_of_oracle"] == 1.0
    assert frac.loc["noisy", "fraction_of_oracle"] == pytest.approx(frac.loc["noisy", "r"] / frac.loc["oracle", "r"])
    with pytest.raises(FileNotFoundError, match="ground_truth"):
        oracle_predictions(synth_cache, synth_cache, parts, norm)
