"The grid runner and the summary: papermill cells, failures recorded and retried, a killed grid finished, the summary's numbers."
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from edanb.cli import main
from edanb.experiment import EXPERIMENTS, load_grid, run_grid, run_summary
from edanb.train import TrainConfig

BIN = Path(sys.executable).parent


def write_grid(path: Path, small: dict, models: list, **base) -> Path:
    base = {**small, "folds": 3, "epochs": 2, "window": 16, "stride": 4, "batch_size": 8, "lr": 3e-3, **base}
    path.write_text(yaml.safe_dump(dict(base=base, grid=dict(model=models))))
    return path


@pytest.fixture(scope="module")
def grid_run(small, tmp_path_factory) -> dict:
    "A 3-cell grid, one cell with a bad parameter, run twice."
    root = tmp_path_factory.mktemp("grid")
    grid = write_grid(root / "grid.yaml", small, ["landmarks", "naive", "nosuchmodel"])
    first = run_grid(grid, root / "results", jobs=2, progress=False)
    failed_at = (root / "results" / "model-nosuchmodel" / "failed.json").stat().st_mtime_ns
    second = run_grid(grid, root / "results", jobs=2, progress=False)
    return dict(results=root / "results", first=first.set_index("cell"), second=second.set_index("cell"),
                failed_at=failed_at)


def test_the_notebook_parameters_are_every_train_config_field():
    nb = json.loads((EXPERIMENTS / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = [line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line]
    assert names == [f.name for f in dataclasses.fields(TrainConfig)] + ["threads"]
    defaults = {}
    exec("".join(cell["source"]), {}, defaults)
    assert {k: v for k, v in defaults.items() if k != "threads"} == dataclasses.asdict(TrainConfig())


def test_a_failing_cell_is_recorded_and_the_others_complete(grid_run):
    first, results = grid_run["first"], grid_run["results"]
    assert first.status.to_dict() == {"model-landmarks": "done", "model-naive": "done", "model-nosuchmodel": "failed"}
    assert "unknown model 'nosuchmodel'" in first.reason["model-nosuchmodel"]
    failure = json.loads((results / "model-nosuchmodel" / "failed.json").read_text())
    assert "unknown model 'nosuchmodel'" in failure["reason"]
    assert (results / "model-nosuchmodel" / "train.ipynb").is_file()   # papermill keeps the failing notebook
    for cell in ("model-landmarks", "model-naive"): assert (results / cell / "metrics.json").is_file()


def test_a_rerun_skips_done_cells_and_retries_only_the_failed_one(grid_run):
    second = grid_run["second"]
    assert second.status.to_dict() == {"model-landmarks": "skipped", "model-naive": "skipped", "model-nosuchmodel": "failed"}
    assert (grid_run["results"] / "model-nosuchmodel" / "failed.json").stat().st_mtime_ns > grid_run["failed_at"]


def test_the_executed_notebook_is_the_record_with_its_figures(grid_run):
    folder = grid_run["results"] / "model-landmarks"
    nb = json.loads((folder / "train.ipynb").read_text())
    images = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert images >= 5, images
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "model = \"landmarks\"" in "".join(injected["source"])
    for name in ("learning_curves", "predictions", "per_subject", "scatter"): assert (folder / f"{name}.png").is_file()
    assert json.loads((folder / "metrics.json").read_text())["config"]["model"] == "landmarks"


def test_the_summary_renders_the_numbers_of_metrics_json(grid_run):
    results = grid_run["results"]
    notebook, html = run_summary(results)
    table = pd.read_csv(results / "summary.csv").set_index("run")
    text = html.read_text()
    for run in ("model-landmarks", "model-naive"):
        metrics = json.loads((results / run / "metrics.json").read_text())
        summary = pd.DataFrame(metrics["summary"])
        row = summary[(summary.model == metrics["config"]["model"]) & (summary.metric == "ccc")].iloc[0]
        cell = f"{row['mean']:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        assert table.loc[run, "ccc"] == cell
        assert cell in text
        test = next(t for t in metrics["tests"] if t["model"] == metrics["config"]["model"] and t["baseline"] == "elapsed"
                    and t["metric"] == "r") if run != "model-naive" else None
        if test: assert np.isclose(table.loc[run, "p_vs_elapsed (r)"], test["p_value"])
    assert "Can EDA be predicted from the face?" in text
    assert table.loc["model-naive", "rest_vs_stress"].startswith("0.50")   # a constant prediction is chance


def test_a_killed_grid_rerun_finishes_with_the_same_results(small, tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", small, ["landmarks"], epochs=3)
    whole = run_grid(grid, tmp_path / "whole", progress=False)
    assert (whole.status == "done").all()
    process = subprocess.Popen([BIN / "edanb", "run", grid, "--results", tmp_path / "killed", "--quiet"],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # one cell: nothing varies, so its folder is "run"
    checkpoint, deadline = tmp_path / "killed" / "run" / "fold0" / "last.pt", time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None: time.sleep(0.2)
    assert process.poll() is None and checkpoint.exists(), "the grid should still be running after its first epoch"
    os.killpg(process.pid, signal.SIGKILL); process.wait()
    time.sleep(3)   # the orphaned kernel notices that papermill is gone and exits
    assert not (tmp_path / "killed" / "run" / "done.json").exists()
    again = run_grid(grid, tmp_path / "killed", progress=False)
    assert again.status.tolist() == ["done"]
    a = pd.read_parquet(tmp_path / "whole" / "run" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "killed" / "run" / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "whole" / "run" / "metrics.json").read_text())["summary"] == \
           json.loads((tmp_path / "killed" / "run" / "metrics.json").read_text())["summary"]


@pytest.mark.parametrize("grid, message", [
    ("missing.yaml", "no such grid file"),
    ("bad_key", "unknown parameter(s) ['modle']"),
])
def test_run_command_fails_at_once_on_a_bad_grid(tmp_path, capsys, grid, message):
    if grid == "bad_key":
        grid = tmp_path / "g.yaml"; grid.write_text("grid:\n  modle: [naive]\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(grid) in err[0]
    assert not (tmp_path / "r").exists()


def test_the_shipped_grids_are_valid():
    demo, study = load_grid(EXPERIMENTS / "demo.yaml"), load_grid(EXPERIMENTS / "study.yaml")
    models = {c.params.get("model") for c in demo}
    assert {"naive", "seqcnn", "seqcnn_bvp", "physnet", "deepphys", "tam3d", "landmarks"} <= models
    augmented = {c.params.get("model") for c in demo if c.params.get("augment_p", 0) > 0}
    assert augmented & {c.params.get("model") for c in demo if c.params.get("augment_p", 0) == 0} - {"naive"}
    assert all(c.params.get("folds", 0) >= 2 for c in demo)
    assert len(study) > len(demo)


def test_runs_pair_only_when_every_other_field_is_equal_and_verdicts_say_which_is_better(grid_run):
    from edanb.experiment import collect_runs, compare_runs, per_subject, runs_differing_in, study_table, verdict
    results = grid_run["results"]
    table = study_table(collect_runs(results))
    assert sorted(map(sorted, runs_differing_in(table, "model"))) == [["model-landmarks", "model-naive"]]
    other = table.copy()
    other.loc[other.run == "model-naive", "config"] = other.config[other.run == "model-naive"].map(
        lambda c: json.dumps({**json.loads(c), "epochs": 9}))
    assert runs_differing_in(other, "model") == []                          # more epochs: not a comparison of models
    comparison = compare_runs(results, "model-landmarks", "model-naive", "mse")
    a, b = per_subject(results, "model-landmarks", "mse"), per_subject(results, "model-naive", "mse")
    assert comparison["better_in"] == int((a < b).sum())                     # lower MSE is better
    assert f"model-landmarks better in {comparison['better_in']} of" in verdict(comparison)
