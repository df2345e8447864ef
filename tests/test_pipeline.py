"Dataset -> model -> loss -> stitched metrics, on the cached synthetic dataset: the pieces fit together."
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from edanb.dataset import DatasetConfig, make_datasets
from edanb.metrics import make_loss, metrics_table, predictions_table, summarise
from edanb.models import MODELS, create_model

SPLIT = dict(train=["s1", "s2", "s3", "s4"], val=["s5"], test=["s6"])


@pytest.fixture(scope="module")
def loaders(synth_cache):
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(window=16, stride=8, diff=True, landmarks=True))
    return datasets, norm


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_reads_a_real_batch(loaders, name):
    datasets, _ = loaders
    torch.manual_seed(0)
    batch = next(iter(DataLoader(datasets["train"], batch_size=3, shuffle=True)))
    model = create_model(name)
    for key in model.inputs: assert key in batch
    out = model(batch)
    assert out.shape == batch["eda"].shape == (3, 16)
    loss = make_loss("mse+npc")(out, batch["eda"])
    loss.backward()
    assert torch.isfinite(loss)


def test_landmark_model_trains_and_is_scored(synth_cache):
    """A few epochs of the cheapest model, scored on the test subject against the naive baseline.
    The mouth opening follows each SCR, so the target is the within-recording deviation ('subject' scaling)."""
    datasets, norm = make_datasets(synth_cache, SPLIT, DatasetConfig(window=16, stride=4, landmarks=True,
                                                                     eda_scaling="subject", augment_p=0))
    torch.manual_seed(0)
    model, naive = create_model("landmarks"), create_model("naive")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = make_loss("mse")
    first = last = None
    for epoch in range(10):
        total = 0.0
        for batch in DataLoader(datasets["train"], batch_size=16, shuffle=True):
            opt.zero_grad()
            loss = loss_fn(model(batch), batch["eda"])
            loss.backward(); opt.step()
            total += loss.item()
        first, last = first or total, total
    assert last < 0.8 * first   # the training loss goes down
    test = datasets["test"]
    tables = []
    for label, m in (("landmarks", model.eval()), ("naive", naive.eval())):
        with torch.no_grad():
            preds = np.concatenate([m(b).numpy() for b in DataLoader(test, batch_size=32)])
        tables.append(predictions_table(test.clips.recording, test.clips.start, preds, test.targets, norm)
                      .assign(model=label))
    samples = pd.concat(tables)
    assert set(samples.groupby("model").size()) == {sum(len(t) for t in test.targets.values())}
    recordings = metrics_table(samples).set_index(["model", "recording"])
    assert recordings.loc["naive", "r"].isna().all()
    print(recordings.loc["landmarks", ["r", "mse"]])
    assert recordings.loc["landmarks", "r"].mean() > 0.3, recordings.loc["landmarks"]   # it tracks the test subject's EDA
    summary = summarise(metrics_table(samples, "subject"), n_boot=200).set_index(["model", "metric"])
    assert summary.loc[("naive", "r"), "subjects"] == 0 and summary.loc[("landmarks", "r"), "subjects"] == 1
