"Shared fixtures: small synthetic datasets, generated once per test session."
import shutil
import warnings
from pathlib import Path

import pytest

from edanb.synth import SynthConfig, generate

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

# Large enough for the statistical checks (18 recordings x 120 EDA samples), small enough for CI.
STATS_CONFIG = dict(subjects=6, seconds=30, size=160, seed=0)

@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    "Coupling 1: the face carries the arousal."
    root = tmp_path_factory.mktemp("synth") / "ubfc"
    generate(root, SynthConfig(**STATS_CONFIG, coupling=1.0), progress=False)
    return root

@pytest.fixture(scope="session")
def null_root(tmp_path_factory) -> Path:
    "Coupling 0: the null control."
    root = tmp_path_factory.mktemp("null") / "ubfc"
    generate(root, SynthConfig(**STATS_CONFIG, coupling=0.0), progress=False)
    return root

@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    "Two subjects, 4 s, 64 px: a valid dataset for the reader's bad-input tests (copy it before breaking it)."
    root = tmp_path_factory.mktemp("tiny") / "ubfc"
    generate(root, SynthConfig(subjects=2, seconds=4, size=64), progress=False)
    return root

@pytest.fixture
def dataset(tiny_root, tmp_path) -> Path:
    "A private copy of the tiny dataset, free to break."
    return Path(shutil.copytree(tiny_root, tmp_path / "ubfc"))
