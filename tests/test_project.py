"The project itself: notebooks and package in sync, notebooks clean, README in sync, CLI installed."
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(tmp_path) -> Path:
    dst = tmp_path / "project"
    dst.mkdir()
    for name in ("settings.ini", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for folder in ("nbs", "edanb"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dst


def differences(a: Path, b: Path) -> list[str]:
    "Files that differ, or exist on one side only, between two trees."
    cmp, out = filecmp.dircmp(a, b, ignore=["__pycache__", ".ipynb_checkpoints"]), []
    def walk(c, prefix=""):
        out.extend(prefix + n for n in c.left_only + c.right_only + c.diff_files)
        for name, sub in c.subdirs.items(): walk(sub, f"{prefix}{name}/")
    walk(cmp)
    return out


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_notebooks_and_package_in_sync(tmp_path):
    project = copy_project(tmp_path)
    run([str(BIN / "nbdev_export")], project)
    changed = differences(ROOT / "edanb", project / "edanb")
    assert not changed, f"notebooks and library are not in sync (run `make export`): {changed}"


def test_notebooks_are_clean(tmp_path):
    project = copy_project(tmp_path)
    run([str(BIN / "nbdev_clean")], project)
    changed = differences(ROOT / "nbs", project / "nbs")
    assert not changed, f"unstripped notebooks (run `make export`): {changed}"


def test_readme_matches_index_notebook():
    result = run([str(BIN / "jupyter"), "nbconvert", "--to", "markdown", "--stdout", "nbs/index.ipynb"], ROOT)
    assert result.stdout == (ROOT / "README.md").read_text(), "README.md is out of date: run `make readme`"


def test_cli_lists_subcommands():
    result = run([str(BIN / "edanb"), "--help"], ROOT)
    for command in ("info", "synth", "split", "preprocess", "models"):
        assert command in result.stdout


@pytest.mark.slow
def test_cli_models():
    from edanb.models import MODELS
    result = run([str(BIN / "edanb"), "models", "--time", "--batch", "1", "--frames", "8", "--size", "32"], ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "forward_ms" in lines[0] and len(lines) == 1 + len(MODELS)
    assert any(line.split()[:3] == ["seqcnn_bvp", "frames,", "bvp"] for line in lines)


@pytest.mark.slow
def test_cli_synth_info_split(tmp_path):
    data = tmp_path / "data"
    result = run([str(BIN / "edanb"), "synth", str(data), "--subjects", "3", "--seconds", "2", "--size", "64",
                  "--quiet"], tmp_path)
    assert "9 recording(s)" in result.stdout and "oracle ceiling r =" in result.stdout
    assert "9 recording(s) ok, 0 gap(s), 0 problem(s)" in run([str(BIN / "edanb"), "info", str(data)], tmp_path).stdout
    run([str(BIN / "edanb"), "split", str(data), "--out", str(tmp_path / "split.json")], tmp_path)
    import json
    split = json.loads((tmp_path / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == ["s1", "s2", "s3"]
    bad = subprocess.run([str(BIN / "edanb"), "synth", str(tmp_path / "x"), "--subjects", "0"], capture_output=True, text=True)
    assert bad.returncode == 1 and "need subjects >= 1" in bad.stderr
