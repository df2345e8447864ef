"The training loop: artefacts, best-weight reload, resume after a kill, clipping, folds, DDP under torchrun, CLI errors."
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from edanb import train
from edanb.cli import main
from edanb.models import create_model
from edanb.metrics import run_metrics
from edanb.train import TrainConfig, fit, train_epoch

BIN = Path(sys.executable).parent


def config(small, out, **kw) -> TrainConfig:
    return TrainConfig(**{**small, "out": str(out), "model": "landmarks", "window": 16, "stride": 4, "batch_size": 8,
                          "lr": 3e-3, "epochs": 2, "folds": 3, "progress": False, "eda_scaling": "zscore", "frame_scaling": "unit", **kw})


def test_a_run_writes_every_artefact_and_its_metrics_recompute(small, tmp_path):
    metrics = fit(config(small, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("config.json", "predictions.parquet", "metrics.json"): assert (run / name).is_file(), name
    for fold in range(3):
        for name in ("split.json", "normaliser.json", "history.csv", "best.pt", "last.pt", "predictions.parquet"):
            assert (run / f"fold{fold}" / name).is_file(), (fold, name)
        history = pd.read_csv(run / f"fold{fold}" / "history.csv")
        assert list(history.epoch) == [0, 1]
        assert {"train_loss", "val_loss", "val_r", "val_clip_r", "lr", "seconds"} <= set(history.columns)
    samples = pd.read_parquet(run / "predictions.parquet")
    assert {"subject", "task", "t", "target_us", "pred_us", "fold"} <= set(samples.columns)
    model_rows = samples[samples.model == "landmarks"]
    per_subject = model_rows.groupby("subject").fold.unique()
    assert len(per_subject) == 6 and all(len(f) == 1 for f in per_subject)   # every subject tested in exactly one fold
    assert model_rows.groupby("recording")["sample"].apply(lambda s: s.is_unique).all()
    saved = json.loads((run / "metrics.json").read_text())
    recomputed = json.loads(json.dumps(run_metrics(samples, small["data"]), default=float))
    for key in recomputed: assert saved[key] == recomputed[key], key
    assert saved == metrics
    assert {"naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "oracle", "landmarks"} == set(saved["models"])
    assert {t["baseline"] for t in saved["tests"]} == {"naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "true_tonic",
                                                      "own_chance"}
    assert saved["trained_on"] == dict(output="level", scaling="zscore", loss="mse+npc", shape_only=False,
                                       centring="the training recordings' mean EDA")
    assert saved["provenance"] == json.loads((run / "provenance.json").read_text())


def test_the_best_epoch_is_reloaded_before_testing(small, tmp_path, monkeypatch):
    "The selection metric is made to fall every epoch: epoch 0 is the best, and the test must use its weights."
    values = iter([3.0, 2.0, 1.0])
    monkeypatch.setattr(train, "selection_value", lambda *a: next(values))
    cfg = config(small, tmp_path / "run", folds=0, epochs=3)
    fit(cfg)
    fold = tmp_path / "run" / "fold0"
    best, last = (torch.load(fold / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert best["epoch"] == 0 and last["state"]["epoch"] == 3
    samples = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert (samples.best_epoch == 0).all()
    datasets, norm = train.make_datasets(cfg.cache, json.loads((fold / "split.json").read_text()),
                                         train.dataset_config(cfg, ("landmarks",)))
    got = samples[samples.model == "landmarks"].pred.to_numpy()
    for weights, same in ((best["model"], True), (last["model"], False)):
        model = create_model("landmarks", "tiny", size=32)
        model.load_state_dict(weights)
        preds = train.predict(model, datasets["test"], cfg, torch.device("cpu"))
        table = train.score(datasets["test"], preds, norm, cfg)
        assert np.allclose(table.pred.to_numpy(), got, atol=1e-6) == same


def _train_command(small, out, epochs) -> list[str]:
    return [sys.executable, "-m", "edanb", "train", "--data", small["data"], "--cache", small["cache"], "--out", str(out),
            "--model", "landmarks", "--window", "16", "--stride", "4", "--batch-size", "8", "--lr", "0.003",
            "--epochs", str(epochs), "--no-progress"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(small, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_command(small, tmp_path / "whole", 6), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_command(small, tmp_path / "killed", 6), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    history = tmp_path / "killed" / "fold0" / "history.csv"
    deadline = time.time() + 300
    while not (history.exists() and len(pd.read_csv(history)) >= 1) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    done = len(pd.read_csv(history))
    assert 1 <= done < 6, f"the kill came after {done} epochs"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = subprocess.run(_train_command(small, tmp_path / "killed", 6), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(tmp_path / run / "fold0" / name, weights_only=True)["model"] for run in ("whole", "killed"))
        for key in a: assert torch.equal(a[key], b[key]), (name, key)
    assert pd.read_csv(tmp_path / "whole" / "fold0" / "history.csv").drop(columns="seconds").equals(
        pd.read_csv(history).drop(columns="seconds"))
    again = subprocess.run(_train_command(small, tmp_path / "killed", 6), env=env, capture_output=True, text=True)
    assert "not retrained" in again.stdout


def test_gradients_are_clipped_after_backward(small, monkeypatch):
    cfg = config(small, "unused", grad_clip=0.01, folds=0)
    model = create_model("landmarks", "tiny", size=32)
    datasets, _ = train.make_datasets(cfg.cache, train.make_splits(cfg)[0], train.dataset_config(cfg, model.inputs))
    loader = torch.utils.data.DataLoader(datasets["train"], batch_size=8)
    optimiser, _ = train.make_optimiser(model, cfg)
    norms, step = [], optimiser.step
    def checked_step(*a, **kw):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
        return step(*a, **kw)
    monkeypatch.setattr(optimiser, "step", checked_step)
    out = train_epoch(model, loader, optimiser, train.make_loss("mse"), cfg, torch.device("cpu"),
                      torch.amp.GradScaler("cpu", enabled=False), "test")
    assert norms and max(norms) <= 0.01 * (1 + 1e-5)
    assert out["grad_norm"] > 0.01   # the raw norm was larger: the clip did something


@pytest.mark.torchrun
def test_ddp_under_torchrun_writes_the_same_schema(small, tmp_path):
    single = fit(config(small, tmp_path / "single", folds=0, epochs=1, eda_scaling="subject", frame_scaling="recording"))  # CLI defaults
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "edanb", "train"]
    cmd += _train_command(small, tmp_path / "ddp", 1)[4:] + ["--folds", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert set(ddp) == set(single) and set(ddp["models"]) == set(single["models"])
    assert pd.DataFrame(ddp["per_subject"]).columns.tolist() == pd.DataFrame(single["per_subject"]).columns.tolist()
    assert not list((tmp_path / "ddp").glob("**/.*tmp-*"))   # no half-written file left by a second writer


@pytest.mark.parametrize("args,message", [
    (["--cache", "/nonexistent/cache"], "no such cache folder"),
    (["--model", "vit"], "unknown model 'vit'"),
    (["--model-args", "{bad"], "not JSON"),
])
def test_train_command_fails_at_once_with_one_clear_line(small, tmp_path, capsys, args, message):
    base = ["train", "--data", small["data"], "--cache", small["cache"], "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(base + args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_train_command_names_a_cache_without_the_model_inputs(small, tmp_path, capsys):
    cache = Path(shutil.copytree(small["cache"], tmp_path / "cache"))
    for path in cache.glob("*/landmarks.npy"):   # a cache built without --landmarks
        path.unlink()
        meta = json.loads((path.parent / "meta.json").read_text()); meta["key"]["config"]["landmarks"] = False
        meta.get("arrays", {}).pop("landmarks", None)
        (path.parent / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--data", small["data"], "--cache", str(cache), "--out", str(tmp_path / "run"),
                 "--model", "landmarks", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no landmarks" in err[0] and str(cache) in err[0], err


def test_train_command_rejects_an_unknown_option(small):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--cache", small["cache"], "--learning-rate", "1"])
    assert exit_.value.code == 2


def test_the_device_resident_data_path_trains_and_scores(small, tmp_path):
    metrics = fit(config(small, tmp_path / "run", folds=0, epochs=1, data_on_device=True, augment_p=1.0))
    assert set(metrics["models"]) == {"landmarks", "naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "oracle"}
    assert pd.read_parquet(tmp_path / "run" / "predictions.parquet").pred.notna().all()


@pytest.mark.torchrun
def test_ddp_with_data_on_the_device_gives_every_rank_the_same_number_of_steps(small, tmp_path):
    "Unequal shares of the shuffled clips would leave one rank waiting in an all-reduce forever."
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "edanb", "train"]
    cmd += _train_command(small, tmp_path / "ddp", 1)[4:] + ["--data-on-device", "--batch-size", "5"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def test_a_naive_run_reports_the_exact_training_mean_once(small, tmp_path):
    fit(config(small, tmp_path / "run", model="naive", epochs=1, eda_scaling="minmax"))
    samples = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert not samples.duplicated(["model", "recording", "sample"]).any()
    assert set(samples.model) == {"naive", "elapsed_task", "task_profile", "elapsed", "bvp_only", "oracle"}
    naive = samples[samples.model == "naive"]
    assert (naive.groupby("fold").pred.nunique() == 1).all()                 # one constant per fold ...
    assert naive.groupby("fold").pred.first().between(0.05, 0.95).all()      # ... the training mean, not the untrained 0


@pytest.mark.torchrun
def test_ddp_across_two_nodes_meeting_at_a_rendezvous(small, tmp_path):
    "The README's multi-node command, as two single-process 'nodes' on this machine (c10d rendezvous on 127.0.0.1, gloo)."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "edanb-test",
                               "-m", "edanb", "train", *_train_command(small, tmp_path / "ddp", 1)[4:], "--folds", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert {"landmarks", "naive", "elapsed"} <= set(metrics["models"])
    split = json.loads((tmp_path / "ddp" / "fold0" / "split.json").read_text())
    assert set(pd.read_parquet(tmp_path / "ddp" / "predictions.parquet").subject) == set(split["test"])
    assert not list((tmp_path / "ddp").glob("**/.*tmp-*"))


def test_a_runs_fold_models_on_its_own_data_give_its_own_predictions(small, tmp_path):
    "transfer_predictions (a run's fold models on other data), pointed at the run's own data, is the run's test."
    from edanb.study import transfer_predictions
    fit(config(small, tmp_path / "run", epochs=1))
    again = transfer_predictions(tmp_path / "run", small["data"], small["cache"])
    saved = pd.read_parquet(tmp_path / "run" / "predictions.parquet").query("model == 'landmarks'")
    key = ["recording", "sample"]
    merged = saved.merge(again, on=key, suffixes=("", "_again"))
    assert len(merged) == len(saved) == len(again)
    np.testing.assert_allclose(merged.pred_again, merged.pred, atol=1e-5)
    assert (merged.fold_again == merged.fold).all()
