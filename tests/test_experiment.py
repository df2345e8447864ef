"The grid runner and the summary: papermill cells, failures recorded and retried, a killed grid finished, the summary's numbers."
import base64
import dataclasses
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from edanb.cli import main
from edanb.experiment import EXPERIMENTS, load_grid, run_grid
from edanb.study import run_summary
from edanb.config import TrainConfig

BIN = Path(sys.executable).parent


def write_grid(path: Path, small: dict, models: list, **base) -> Path:
    base = {**small, "folds": 3, "epochs": 2, "window": 16, "stride": 4, "batch_size": 8, "lr": 3e-3, **base}
    path.write_text(yaml.safe_dump(dict(base=base, grid=dict(model=models))))
    return path


LANDMARKS, NAIVE, FAILING = "model-landmarks__window-16", "model-naive__window-16", "model-naive__window-100000"   # grid_run's cells


@pytest.fixture(scope="module")
def grid_run(small, tmp_path_factory) -> dict:
    "A 3-cell grid, one cell with a bad parameter, run twice."
    root = tmp_path_factory.mktemp("grid")
    grid = write_grid(root / "grid.yaml", small, ["landmarks", "naive"])
    text = yaml.safe_load(grid.read_text())   # a third cell that only its run can find wrong: a window longer than the recordings
    grid.write_text(yaml.safe_dump({**text, "grid": [text["grid"], dict(model="naive", window=100000)]}))
    first = run_grid(grid, root / "results", jobs=2, progress=False)
    failed_at = (root / "results" / FAILING / "failed.json").stat().st_mtime_ns
    second = run_grid(grid, root / "results", jobs=2, progress=False)
    return dict(grid=grid, results=root / "results", small=small, first=first.set_index("cell"), second=second.set_index("cell"),
                failed_at=failed_at)


def test_the_notebook_parameters_are_every_train_config_field():
    nb = json.loads((EXPERIMENTS / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = [line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line]
    assert names == [f.name for f in dataclasses.fields(TrainConfig)] + ["threads", "redact"]
    defaults = {}
    exec("".join(cell["source"]), {}, defaults)
    assert {k: v for k, v in defaults.items() if k not in ("threads", "redact")} == dataclasses.asdict(TrainConfig())


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_complete(grid_run):
    first, results = grid_run["first"], grid_run["results"]
    assert first.status.to_dict() == {LANDMARKS: "done", NAIVE: "done", FAILING: "failed"}
    assert "window 100000: longer than recording" in first.reason[FAILING]
    failure = json.loads((results / FAILING / "failed.json").read_text())
    assert "window 100000: longer than recording" in failure["reason"]
    assert (results / FAILING / "train.ipynb").is_file()   # papermill keeps the failing notebook
    for cell in (LANDMARKS, NAIVE): assert (results / cell / "metrics.json").is_file()


@pytest.mark.slow
def test_a_rerun_skips_done_cells_and_retries_only_the_failed_one(grid_run):
    second = grid_run["second"]
    assert second.status.to_dict() == {LANDMARKS: "skipped", NAIVE: "skipped", FAILING: "failed"}
    assert (grid_run["results"] / FAILING / "failed.json").stat().st_mtime_ns > grid_run["failed_at"]


@pytest.mark.slow
def test_the_executed_notebook_is_the_record_with_its_figures(grid_run):
    folder = grid_run["results"] / LANDMARKS
    nb = json.loads((folder / "train.ipynb").read_text())
    images = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert images >= 5, images
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "model = \"landmarks\"" in "".join(injected["source"])
    for name in ("learning_curves", "predictions", "per_subject", "scatter"): assert (folder / f"{name}.png").is_file()
    assert json.loads((folder / "metrics.json").read_text())["config"]["model"] == "landmarks"


@pytest.mark.slow
def test_the_summary_renders_the_numbers_of_metrics_json(grid_run):
    results = grid_run["results"]
    notebook, html = run_summary(results)
    table = pd.read_csv(results / "summary.csv").set_index("run")
    text = html.read_text()
    for run in (LANDMARKS, NAIVE):
        metrics = json.loads((results / run / "metrics.json").read_text())
        summary = pd.DataFrame(metrics["summary"])
        row = summary[(summary.model == metrics["config"]["model"]) & (summary.metric == "ccc")].iloc[0]
        cell = f"{row['mean']:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        assert table.loc[run, "ccc"] == cell
        assert cell in text
        test = next(t for t in metrics["tests"] if t["model"] == metrics["config"]["model"] and t["baseline"] == "elapsed_task"
                    and t["metric"] == "r") if run != NAIVE else None
        if test: assert np.isclose(table.loc[run, "p_vs_elapsed_task (r)"], test["p_value"])
    assert "Can EDA be predicted from the face?" in text
    assert table.loc[NAIVE, "rest_vs_stress"].startswith("0.50")   # a constant prediction is chance


@pytest.mark.slow
def test_the_summary_is_made_again_when_a_run_is_removed(grid_run, tmp_path):
    results = Path(shutil.copytree(grid_run["results"], tmp_path / "results"))
    run_summary(results)
    assert NAIVE in set(pd.read_csv(results / "summary.csv").run)
    shutil.rmtree(results / NAIVE)
    run_summary(results)
    assert NAIVE not in set(pd.read_csv(results / "summary.csv").run)


@pytest.mark.dask
def test_a_grid_on_a_dask_cluster_equals_the_jobs_run(grid_run, tmp_path):
    "The cells go to the workers of a local Dask cluster this test starts; each worker runs one cell on one thread."
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        table = run_grid(grid_run["grid"], tmp_path / "dask", scheduler=cluster.scheduler_address, progress=False)
        assert "run_cell_on_worker" in cluster.scheduler.task_prefixes   # the cells ran on the workers
    assert table.set_index("cell").status.to_dict() == grid_run["first"].status.to_dict()
    assert "window 100000: longer than recording" in table.set_index("cell").reason[FAILING]
    for cell in (LANDMARKS, NAIVE):
        a = pd.read_parquet(grid_run["results"] / cell / "predictions.parquet")
        b = pd.read_parquet(tmp_path / "dask" / cell / "predictions.parquet")
        pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=0)
        assert json.loads((grid_run["results"] / cell / "metrics.json").read_text())["summary"] == \
               json.loads((tmp_path / "dask" / cell / "metrics.json").read_text())["summary"]
    assert json.loads((tmp_path / "dask" / "grid.json").read_text())["scheduler"] == cluster.scheduler_address


@pytest.mark.slow
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
    ("bad_set", "--set: expected key=value, got 'epochs'"),
    pytest.param("no_scheduler", "tcp://127.0.0.1:9: no Dask scheduler answered", marks=pytest.mark.dask),
])
def test_run_command_fails_at_once_on_a_bad_grid(tmp_path, capsys, grid, message):
    extra = {"bad_set": ["--set", "epochs"], "no_scheduler": ["--scheduler", "tcp://127.0.0.1:9"]}.get(grid, [])
    if grid != "missing.yaml":
        key = "modle" if grid == "bad_key" else "model"
        grid = tmp_path / "g.yaml"; grid.write_text(f"grid:\n  {key}: [naive]\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and (str(grid) in err[0] or extra)
    assert not (tmp_path / "r").exists()


def test_the_shipped_grids_are_valid():
    demo, study = load_grid(EXPERIMENTS / "demo.yaml"), load_grid(EXPERIMENTS / "study.yaml")
    models = {c.params.get("model") for c in demo}
    assert {"naive", "seqcnn", "seqcnn_bvp", "physnet", "deepphys", "tam3d", "landmarks"} <= models
    augmented = {c.params.get("model") for c in demo if c.params.get("augment_p", 0) > 0}
    assert augmented & {c.params.get("model") for c in demo if c.params.get("augment_p", 0) == 0} - {"naive"}
    assert all(c.params.get("folds", 0) >= 2 for c in demo)
    assert len(study) > len(demo)
    assert all(c.params.get("preset") == "paper" for c in study)          # the study's model sizes, not the tiny ones
    seed_study = dict(eda_scaling="minmax", frame_scaling="unit", augment_p=0.7, cache="data/ubfc-cache-face")
    own = [c for c in study if all(c.params.get(k) == v for k, v in seed_study.items())]
    assert {"naive", "seqcnn", "seqcnn_bvp", "physnet", "deepphys"} <= {c.params["model"] for c in own}
    configurations = {}
    for c in study:
        key = json.dumps({k: v for k, v in c.params.items() if k != "seed"}, sort_keys=True)
        configurations.setdefault(key, set()).add(c.params.get("seed", 0))
    assert min(len(seeds) for seeds in configurations.values()) >= 3        # every configuration with 3 training seeds


@pytest.mark.slow
def test_runs_pair_only_when_every_other_field_is_equal_and_verdicts_say_which_is_better(grid_run):
    from edanb.study import collect_runs, compare_runs, per_subject, runs_differing_in, study_table, verdict
    results = grid_run["results"]
    table = study_table(collect_runs(results))
    assert sorted(map(sorted, runs_differing_in(table, "model"))) == [[LANDMARKS, NAIVE]]
    other = table.copy()
    other.loc[other.run == NAIVE, "config"] = other.config[other.run == NAIVE].map(
        lambda c: json.dumps({**json.loads(c), "epochs": 9}))
    assert runs_differing_in(other, "model") == []                          # more epochs: not a comparison of models
    comparison = compare_runs(results, LANDMARKS, NAIVE, "mse")
    a, b = per_subject(results, LANDMARKS, "mse"), per_subject(results, NAIVE, "mse")
    assert comparison["better_in"] == int((a < b).sum())                     # lower MSE is better
    assert f"{LANDMARKS} better in {comparison['better_in']} of" in verdict(comparison)


def test_the_slurm_example_asks_for_one_gpu_job_per_cell():
    "experiments/slurm.py (the README's Slurm example): each worker a job with one GPU that runs one cell at a time."
    sys.path.insert(0, str(EXPERIMENTS))
    try: from slurm import slurm_cluster
    finally: sys.path.remove(str(EXPERIMENTS))
    with slurm_cluster(account="proj", cpus=8, gpus=1) as cluster: script = cluster.job_script()
    for line in ("#SBATCH -A proj", "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1", "--nthreads 1", sys.executable):
        assert line in script, script


def frames_shown_in(image: np.ndarray, frames: list[np.ndarray]) -> float:
    """How clearly any of `frames` appears anywhere in `image`, at any size from 48 px: the best normalised correlation
    of their fine detail (minus a blur of one source pixel), matplotlib's upsampling imitated by repeating pixels."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = lambda a, sigma: a - cv2.GaussianBlur(a, (0, 0), sigma)
    best = 0.0
    for side in range(48, min(gray.shape) - 8):
        sigma = side / frames[0].shape[0]
        shown = detail(gray, sigma)
        for frame in frames:
            small = cv2.cvtColor((frame * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
            template = detail(cv2.resize(small, (side, side), interpolation=cv2.INTER_NEAREST), sigma)[4:-4, 4:-4]
            best = max(best, float(cv2.matchTemplate(shown, template, cv2.TM_CCOEFF_NORMED).max()))
    return best


@pytest.mark.slow
def test_a_run_on_data_that_is_not_synthetic_shows_no_face(small, tmp_path):
    "DeepPhys on a copy of the data without edanb's ground truth (so: real people): its figures show no frame unredacted."
    import shutil
    from edanb.study import fold_model
    real = shutil.copytree(small["data"], tmp_path / "ubfc", ignore=shutil.ignore_patterns("ground_truth"))
    grid = write_grid(tmp_path / "grid.yaml", {**small, "data": str(real)}, ["deepphys"], epochs=1)
    assert run_grid(grid, tmp_path / "results", progress=False).status.tolist() == ["done"]
    folder = tmp_path / "results" / "run"
    model, batch = fold_model(folder, fold=0)                    # the clip the notebook shows, as it would show it
    clip = batch["frames"][0]
    frames = [((x - x.min()) / (x.max() - x.min() + 1e-9)).permute(1, 2, 0).numpy() for x in clip[[0, len(clip) - 1]]]
    def figures() -> list[np.ndarray]:
        "The saved figure of the frames and their attention masks, and the same figure inline in the executed notebook."
        nb = json.loads((folder / "train.ipynb").read_text())
        cell = next(c for c in nb["cells"] if "attention_masks" in "".join(c["source"]))
        inline = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        decode = lambda b: cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return [decode((folder / "attention_masks.png").read_bytes())] + [decode(base64.b64decode(b)) for b in inline]
    redacted = figures()
    assert len(redacted) == 2
    # the same finished run rendered again with redact=False (read back, not retrained): the frames are there to find
    subprocess.run([sys.executable, "-m", "papermill", str(EXPERIMENTS / "train.ipynb"), str(folder / "train.ipynb"),
                    "-f", str(folder / ".parameters.json"), "-p", "redact", "False", "--log-level", "ERROR"],
                   check=True, capture_output=True, timeout=600)
    assert min(frames_shown_in(image, frames) for image in figures()) > 0.75   # the check finds frames that are shown
    assert max(frames_shown_in(image, frames) for image in redacted) < 0.5, "an unredacted frame is rendered"


def tiny_notebook(path: Path, code: str) -> Path:
    "An experiment notebook of one cell (papermill injects the cell's parameters, `out` among them, before it)."
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.dask
def test_a_cell_that_kills_its_dask_worker_is_recorded_and_the_grid_goes_on(tmp_path):
    from distributed import LocalCluster
    notebook = tiny_notebook(tmp_path / "nb.ipynb", "import json, pathlib, psutil\n"
        "if out.endswith('seed-1'): psutil.Process().parent().parent().kill()   # kernel -> papermill -> the worker\n"
        "pathlib.Path(out, 'metrics.json').write_text('{}')")
    (tmp_path / "g.yaml").write_text("grid:\n  seed: [0, 1]\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        table = run_grid(tmp_path / "g.yaml", tmp_path / "r", notebook=notebook, progress=False,
                         scheduler=cluster.scheduler_address).set_index("cell")
    assert table.status.to_dict() == {"seed-0": "done", "seed-1": "failed"}
    assert table.reason["seed-1"].startswith("KilledWorker")
    assert json.loads((tmp_path / "r" / "seed-1" / "failed.json").read_text())["reason"] == table.reason["seed-1"]
    assert (tmp_path / "r" / "grid.json").is_file()


@pytest.mark.dask
def test_a_stopped_dask_grid_stops_its_cells_on_the_workers(tmp_path):
    "SIGTERM to `edanb run --scheduler`: the papermill process running on the worker is stopped too."
    import psutil
    from distributed import LocalCluster
    notebook = tiny_notebook(tmp_path / "nb.ipynb", "import time; time.sleep(600)")
    (tmp_path / "g.yaml").write_text("grid:\n  seed: [0]\n")
    cells = lambda: [p for p in psutil.process_iter(["cmdline"]) if "papermill" in " ".join(p.info["cmdline"] or [])
                     and str(tmp_path / "r") in " ".join(p.info["cmdline"] or [])]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        grid = subprocess.Popen([str(BIN / "edanb"), "run", str(tmp_path / "g.yaml"), "--results", str(tmp_path / "r"),
                                 "--notebook", str(notebook), "--scheduler", cluster.scheduler_address, "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not cells() and time.time() < deadline: time.sleep(0.5)
        assert cells(), "the cell never started"
        grid.send_signal(signal.SIGTERM)
        grid.wait(timeout=60)
        deadline = time.time() + 20
        while cells() and time.time() < deadline: time.sleep(0.5)
        left = cells()
        for p in left: p.kill()
        assert not left, "a cell kept running on the worker after the grid was stopped"


def test_the_summary_lists_the_runs_without_results_and_is_keyed_on_the_runs(grid_run, tmp_path):
    "The failed cell is listed with its reason; a run that finishes again (another time) makes the summary again."
    from edanb.study import unfinished_runs
    results = Path(shutil.copytree(grid_run["results"], tmp_path / "results"))
    missing = unfinished_runs(results).set_index("run")
    assert list(missing.index) == [FAILING] and "window 100000: longer than recording" in missing.reason.iat[0]
    _, html = run_summary(results)
    assert FAILING in html.read_text() and "longer than recording" in html.read_text()
    written = html.stat().st_mtime_ns
    assert run_summary(results)[1].stat().st_mtime_ns == written                  # nothing changed: reused
    metrics = results / NAIVE / "metrics.json"
    os.utime(metrics, ns=(metrics.stat().st_atime_ns, metrics.stat().st_mtime_ns - 10**9))   # the run finished at another time
    assert run_summary(results)[1].stat().st_mtime_ns > written


@pytest.mark.slow
def test_the_summary_shows_each_datasets_runs_and_references_apart(grid_run, tmp_path, capsys):
    "Runs on two datasets: the CLI table has a block per dataset, and the notebook each dataset's references."
    results = Path(shutil.copytree(grid_run["results"], tmp_path / "results"))
    metrics = json.loads((results / NAIVE / "metrics.json").read_text())
    metrics["config"]["data"] = "data/other"
    (results / NAIVE / "metrics.json").write_text(json.dumps(metrics))
    assert main(["summary", str(results)]) == 0
    out = capsys.readouterr().out
    first, second = out.index(f"data {grid_run['small']['data']}:"), out.index("data data/other:")
    assert first < out.index(LANDMARKS) < second < out.index(NAIVE, second), out
    from edanb.study import collect_runs, reference_table, summary_table
    references = reference_table(collect_runs(results), summary_table(results))
    assert list(dict.fromkeys(references.data)) == [grid_run["small"]["data"], "data/other"]
    assert set(references.run) == {LANDMARKS, NAIVE} and "oracle" in set(references.reference)
    assert "data/other" in (results / "summary.html").read_text()


@pytest.mark.slow
def test_a_damaged_metrics_json_is_listed_not_a_crash(grid_run, tmp_path):
    from edanb.study import unfinished_runs
    results = Path(shutil.copytree(grid_run["results"], tmp_path / "results"))
    metrics = results / NAIVE / "metrics.json"
    metrics.write_text(metrics.read_text()[:100])   # truncated, as by a full disk outside edanb's atomic writes
    (results / LANDMARKS / "metrics.json").write_text("[]")
    missing = unfinished_runs(results).set_index("run").reason
    assert missing[NAIVE].startswith("metrics.json is unreadable") and missing[LANDMARKS] == "metrics.json holds no config or summary"
    with pytest.raises(FileNotFoundError, match="no finished run"): run_summary(results)


@pytest.mark.slow
def test_the_summary_asks_whether_the_model_sees_the_responses(grid_run):
    "Every run scores the tonic and phasic parts; the best face-only run's phasic r and SCR F1 are tested against the per-task line."
    from edanb.study import collect_runs, study_answers, study_table
    results = grid_run["results"]
    metrics = json.loads((results / LANDMARKS / "metrics.json").read_text())
    scored = {s["metric"] for s in metrics["summary"] if s["model"] == "landmarks"}
    assert {"tonic_r", "tonic_ccc", "phasic_r", "scr_precision", "scr_recall", "scr_f1", "scr_rate", "scr_rate_true"} <= scored
    naive = [s for s in metrics["summary"] if s["model"] == "naive" and s["metric"] == "scr_f1"][0]
    assert naive["mean"] == 0.0   # a constant has no response
    tested = {(t["baseline"], t["metric"]) for t in metrics["tests"] if t["model"] == "landmarks"}
    assert {("elapsed_task", "phasic_r"), ("elapsed_task", "scr_f1"), ("true_tonic", "phasic_r"), ("own_chance", "scr_f1")} <= tested
    drift = {s["metric"]: s["mean"] for s in metrics["summary"] if s["model"] == "true_tonic"}
    assert set(drift) == {"phasic_r", "scr_f1"} and drift["scr_f1"] < 0.2, drift   # scored in these alone; slow: almost no response
    assert "true_tonic" not in metrics["models"] and not any(r["model"] == "true_tonic" for r in metrics["per_subject"])
    runs = collect_runs(results)
    answers = " ".join(study_answers(results, study_table(runs), runs))
    assert f"**Does the model see skin-conductance responses, or only the drift?** The best face-only run, {LANDMARKS}" in answers
    assert "In phasic r, against the true EDA's own tonic part (the low-passed truth" in answers, answers
    assert "In SCR F1, against the F1 its own onsets reach shifted in time (chance at its own rate), it is better in" in answers, answers
