"Shared fixtures: small synthetic datasets, generated once per test session."
import shutil
from pathlib import Path

import pytest

from edanb.synth import SynthConfig, generate

# Large enough for the statistical checks (18 recordings x 120 EDA samples), small enough for CI. The shared fixtures are
# the simple world (one face, cues at lag 0, clean EDA): they test the pipeline's mechanics against figures known in
# advance; the rich world (the generator's default) has fixtures and tests of its own (test_synth, test_eda_quality).
STATS_CONFIG = dict(subjects=6, seconds=30, size=160, seed=0, world="simple")

def make_dataset(factory, name: str, **config) -> Path:
    "A synthetic dataset of `config` (SynthConfig fields) in a fresh temporary folder `name`."
    root = factory.mktemp(name) / "ubfc"
    generate(root, SynthConfig(**config), progress=False)
    return root

@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    "Coupling 1: the face and the pulse carry the arousal."
    return make_dataset(tmp_path_factory, "synth", **STATS_CONFIG, video_coupling=1.0, pulse_coupling=1.0)

@pytest.fixture(scope="session")
def null_root(tmp_path_factory) -> Path:
    "Coupling 0 for the video and the pulse: the null control."
    return make_dataset(tmp_path_factory, "null", **STATS_CONFIG, video_coupling=0.0, pulse_coupling=0.0)

@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    "Two subjects, 4 s, 64 px: a valid dataset for the bad-input tests (copy it before breaking it)."
    return make_dataset(tmp_path_factory, "tiny", subjects=2, seconds=4, size=64, world="simple")

@pytest.fixture
def dataset(tiny_root, tmp_path) -> Path:
    "A private copy of the tiny dataset, free to break."
    return Path(shutil.copytree(tiny_root, tmp_path / "ubfc"))

@pytest.fixture(scope="session")
def synth_cache(synth_root, tmp_path_factory) -> Path:
    "synth_root preprocessed once (72 px crops with landmarks): shared by the preprocessing and dataset tests."
    from edanb.preprocess import PreprocessConfig, preprocess_dataset
    cache = tmp_path_factory.mktemp("synth-cache") / "cache"
    table = preprocess_dataset(synth_root, cache, PreprocessConfig(landmarks=True), workers=2, progress=False)
    assert (table.status == "built").all(), table
    return cache


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> dict:
    "Six subjects, 12 s per task, 32 px crops with landmarks: the smallest dataset that 3 folds can split."
    from edanb.preprocess import PreprocessConfig, preprocess_dataset
    from edanb.synth import SynthConfig, generate
    root = tmp_path_factory.mktemp("train")
    generate(root / "ubfc", SynthConfig(subjects=6, seconds=12, size=96, world="simple"), workers=2, progress=False)
    table = preprocess_dataset(root / "ubfc", root / "cache", PreprocessConfig(size=32, landmarks=True), workers=2,
                               progress=False)
    assert (table.status == "built").all()
    return dict(data=str(root / "ubfc"), cache=str(root / "cache"))


HEAVY_FIXTURES = {"synth_root", "null_root", "synth_cache",   # the statistical datasets: about 30 s to build
                  "rich_root", "people_root", "fast_cache", "spiky", "grouped",   # 8-20 s each: the fast loop leaves them out
                  "pulse_data", "grid_run"}   # the camera pulse's two cached datasets (25 s); a grid run twice with papermill (40 s)


def pytest_collection_modifyitems(items):
    "A test on a heavy dataset is `slow` (`make test` runs it, `make test-fast` does not)."
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())): item.add_marker("slow")


def edit_cached(entry: Path, name: str, array) -> None:
    "Replace one array of a cache entry as a rebuild would, its record in meta.json included (the checksum sees any other edit)."
    import json
    import numpy as np
    from edanb.preprocess import array_record
    np.save(entry / f"{name}.npy", array)
    meta = json.loads((entry / "meta.json").read_text())
    if name in meta.get("arrays", {}): meta["arrays"][name] = array_record(entry / f"{name}.npy", checksum=name != "frames")
    (entry / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
