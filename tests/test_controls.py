"Controls a reviewer would accept: references in every run, the oracle above the models, the scalings, provenance."
import json

import numpy as np
import pandas as pd
import pytest

from edanb.core import provenance
from edanb.dataset import DatasetConfig, make_datasets
from edanb.experiment import cell_status
from edanb.metrics import metrics_table
from edanb.study import collect_runs, study_answers, study_table
from edanb.train import TrainConfig, fit

SPLIT = dict(train=["s1", "s2", "s3", "s4"], val=["s5"], test=["s6"])


def small_config(small, out, **kw) -> TrainConfig:
    return TrainConfig(**{**small, "out": str(out), "window": 16, "stride": 4, "batch_size": 8, "lr": 3e-3, "epochs": 3,
                          "folds": 3, "progress": False, **kw})


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    "Three models trained with the default scalings, 3 folds of the six-subject dataset."
    results = tmp_path_factory.mktemp("controls")
    return results, {m: fit(small_config(small, results / m, model=m)) for m in ("seqcnn", "seqcnn_bvp", "landmarks")}


@pytest.mark.slow
def test_every_run_carries_the_references_and_their_tests(trained):
    _, runs = trained
    for model, metrics in runs.items():
        assert {model, "naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "oracle"} == set(metrics["models"])
        assert {"naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "true_tonic", "own_chance"} == \
               {t["baseline"] for t in metrics["tests"]}
        assert {"r_lag", "lag_s"} <= {s["metric"] for s in metrics["summary"]}
        assert metrics["trained_on"]["centring"] == "each test recording's own mean EDA (from its labels)"
        assert metrics["provenance"]["code"] and metrics["provenance"]["dataset"]


@pytest.mark.slow
def test_the_oracle_is_at_least_as_good_as_every_trained_model_in_every_fold(trained):
    results, runs = trained
    for model in runs:
        samples = pd.read_parquet(results / model / "predictions.parquet")
        fold_of = samples.groupby("subject").fold.first()
        r = metrics_table(samples, "subject").pivot(index="subject", columns="model", values="r").groupby(fold_of).mean()
        assert (r["oracle"] >= r[model]).all(), r[["oracle", model]]
        assert (r["oracle"] > 0.8).all()              # the cues, centred as the targets are, carry the EDA


@pytest.mark.slow
def test_the_summary_answers_against_the_per_task_line_and_the_pulse(trained):
    results, _ = trained
    runs = collect_runs(results)
    assert (runs.stale == "").all()                   # made by this code, from this data
    answers = study_answers(results, study_table(runs), runs)
    face = answers[0]
    assert "The best face-only run" in face and "seqcnn_bvp" not in face        # a BVP model does not answer for the face
    assert "against one elapsed-time line per task" in face and "after Bonferroni over the 2 face-only runs" in face
    assert any(a.startswith("**Does the face add to the pulse?** seqcnn_bvp") and "heart rate alone" in a for a in answers)


@pytest.mark.slow
def test_the_cached_heart_rate_is_the_true_one(synth_root, synth_cache):
    "The BVP-only reference stands on the cached heart rate: within 2 bpm of the generator's in every recording."
    from edanb.preprocess import load_cached
    for signals in sorted((synth_root / "ground_truth").glob("*_signals.csv")):
        name = signals.name.removesuffix("_signals.csv")
        entry, truth = load_cached(synth_cache, name), pd.read_csv(signals)
        assert np.median(np.abs(entry["hr"] - np.interp(entry["t"], truth.t, truth.heart_rate))) < 2, name


def test_subject_scaling_keeps_the_rest_to_stress_rise_that_recording_removes(small):
    means = {}
    for scaling in ("recording", "subject"):
        datasets, _ = make_datasets(small["cache"], SPLIT, DatasetConfig(eda_scaling=scaling, augment_p=0))
        means[scaling] = {n.split("_")[1]: float(np.mean(y)) for n, y in datasets["test"].targets.items()}
    assert all(abs(v) < 1e-5 for v in means["recording"].values())
    assert abs(means["subject"]["T1"]) < 1e-5                       # the rest task is the baseline ...
    assert means["subject"]["T2"] > 0.3 and means["subject"]["T3"] > 0.3   # ... and the stress tasks rise above it
    stress_only, _ = make_datasets(small["cache"], SPLIT, DatasetConfig(eda_scaling="subject", tasks="T2,T3", augment_p=0))
    assert set(stress_only["test"].targets) == {"s6_T2", "s6_T3"}   # T1 is read for its mean only
    assert np.mean(stress_only["test"].targets["s6_T3"]) > 0.3


def test_a_run_made_by_other_code_is_made_again(small, tmp_path, capsys):
    config = small_config(small, tmp_path / "run", model="naive", epochs=1, folds=0)
    fit(config)
    saved = tmp_path / "run" / "provenance.json"
    made = json.loads(saved.read_text())
    saved.write_text(json.dumps({**made, "code": "0ther"}))
    capsys.readouterr()
    again = fit(config)
    assert f"made by other code or data (code 0ther -> {made['code']}): made again" in capsys.readouterr().out
    assert again["provenance"] == made == json.loads(saved.read_text())
    assert (tmp_path / "run" / ".stale" / "0" / "metrics.json").is_file()   # the old run is kept aside, not lost
    saved.unlink()                                    # a run folder of an edanb that recorded nothing, and called
    old = json.loads((tmp_path / "run" / "config.json").read_text())   # today's 'recording' scaling 'subject'
    (tmp_path / "run" / "config.json").write_text(json.dumps({**old, "eda_scaling": "subject"}))
    fit(config)
    assert "no provenance recorded" in capsys.readouterr().out
    saved.write_text(json.dumps({**made, "dataset": "0ther"}))
    kept = fit(TrainConfig(**{**config.__dict__, "reuse_stale": True}))
    assert "kept (reuse_stale)" in capsys.readouterr().out and kept["provenance"] == made


def test_a_grid_cell_made_by_other_code_is_stale(small, tmp_path):
    params = dict(model="naive", data=small["data"], cache=small["cache"])
    folder = tmp_path / "cell"; folder.mkdir()
    for name, value in (("params.json", params), ("done.json", {}), ("provenance.json", provenance(small["data"], small["cache"]))):
        (folder / name).write_text(json.dumps(value))
    assert cell_status(folder, params) == "done"
    (folder / "provenance.json").write_text(json.dumps({**provenance(small["data"], small["cache"]), "torch": "1.0"}))
    assert cell_status(folder, params) == "stale"
    assert cell_status(folder, {**params, "reuse_stale": True}) == "done"   # and reuse_stale is not another configuration
