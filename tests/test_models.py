"Every registered model: shapes, gradients, clip lengths, determinism, autocast, and that it can learn."
import math

import pytest
import torch

from edanb.dataset import frame_difference
from edanb.models import MODELS, OUTPUTS, count_parameters, create_model, example_batch, register

# the model zoo's registry, plus the BVP variant of physnet
VARIANTS = [(name, {}) for name in MODELS] + [("physnet", dict(use_bvp=True))]
IDS = [name + ("+bvp" if kw else "") for name, kw in VARIANTS]


def make(name, size=32, **kw):
    torch.manual_seed(0)
    return create_model(name, size=size, **kw)


def test_unknown_names_are_listed():
    with pytest.raises(ValueError, match="registered models are.*seqcnn"): create_model("vit")
    with pytest.raises(ValueError, match="unknown preset"): create_model("seqcnn", preset="huge")


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_shape_and_gradients(name, kw):
    model = make(name, **kw).train()
    batch = example_batch(batch=3, frames=16, size=32)
    out = model(batch)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    torch.nn.functional.mse_loss(out, batch["eda"]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_clip_lengths(name, kw):
    model = make(name, **kw).eval()
    with torch.no_grad():
        assert model(example_batch(batch=2, frames=64, size=32)).shape == (2, 64)
        short = example_batch(batch=2, frames=1, size=32)
        if getattr(model, "min_frames", 1) > 1:
            with pytest.raises(ValueError, match="at least 8 frames"): model(short)
            assert model(example_batch(batch=2, frames=10, size=32)).shape == (2, 10)   # padded to 12 and cropped
        else:
            assert model(short).shape == (2, 1)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_deterministic_under_a_seed(name, kw):
    batch = example_batch(batch=2, frames=16, size=32)
    outs = []
    for _ in range(2):
        model = make(name, **kw).train()   # dropout on: the seed must fix it too
        torch.manual_seed(1)
        outs.append(model(batch))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_runs_under_autocast(name, kw):
    model = make(name, **kw).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(example_batch(batch=2, frames=16, size=32))
    assert out.shape == (2, 16) and torch.isfinite(out.float()).all()


def test_presets_differ_in_size():
    for name in MODELS:   # at one frame size: deepphys' paper preset is 36 px, where its dense layer is smaller
        if name == "naive": continue
        paper, tiny = (count_parameters(create_model(name, preset, size=72)) for preset in ("paper", "tiny"))
        assert paper > tiny, name


def test_every_model_declares_its_target():
    assert {cls.output for cls in MODELS.values()} <= set(OUTPUTS)
    with pytest.raises(TypeError, match="output"): register("untargeted")(type("Untargeted", (torch.nn.Module,), {}))
    assert "untargeted" not in MODELS


def test_deepphys_paper_preset_runs_at_36_px():
    model = create_model("deepphys", "paper").eval()
    assert model.size == 36 and isinstance(model.standardise, torch.nn.BatchNorm2d)
    with torch.no_grad(): assert model(example_batch(batch=2, frames=3, size=36)).shape == (2, 3)


# ---- each model learns a simple function of its input: catches wiring errors that shape tests miss ----

def smooth_series(g, b, t, cycles=1.5):
    phase = 2 * math.pi * torch.rand(b, 1, generator=g)
    return torch.sin(phase + torch.linspace(0, 2 * math.pi * cycles, t))


def train_on_fresh_batches(model, task, done, steps=300, every=25):
    "Adam on `task(1)`, `task(2)`, ... until `done()` (asked every `every` steps) or `steps`; returns the steps taken."
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        batch = task(step)
        model.train(); opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch), batch["eda"]).backward()
        opt.step()
        if step % every == 0 and done(): break
    return step


def learning_task(name, seed=0, b=8, t=16, size=32):
    "A batch whose 'eda' is a simple function of the non-video input the model reads (everything else is noise)."
    g = torch.Generator().manual_seed(seed)
    batch = example_batch(b, t, size, seed=seed)
    if name == "naive":
        batch["eda"] = 0.7 + 0.05 * torch.randn(b, t, generator=g)
    elif name == "seqcnn_bvp" or name == "physnet+bvp":      # only the BVP says anything about the target
        batch["bvp"] = smooth_series(g, b, t, 2.0)
        batch["eda"] = batch["bvp"] ** 2
    elif name == "landmarks":                              # the mouth opens and closes
        opening = smooth_series(g, b, t)
        marks = batch["landmarks"][:, :1].expand(-1, t, -1, -1).clone()
        marks[:, :, 57, 1] += 0.05 * (1 + opening)
        marks[:, :, 66, 1] += 0.05 * (1 + opening)
        batch["landmarks"], batch["eda"] = marks, opening
    else: raise ValueError(f"no simple task for {name}: the video models have eda_in_frames")
    return batch


SIMPLE = [("naive", {}), ("seqcnn_bvp", {}), pytest.param("physnet", dict(use_bvp=True), marks=pytest.mark.slow), ("landmarks", {})]


@pytest.mark.parametrize("name,kw", SIMPLE, ids=["naive", "seqcnn_bvp", "physnet+bvp", "landmarks"])
def test_learns_a_simple_target(name, kw):
    "Trained on fresh batches, judged on a held-out one: memorising the training batches cannot pass."
    key = name + ("+bvp" if kw else "")
    model = make(name, **kw)
    held_out = learning_task(key, seed=1000)
    loss_of = lambda: torch.nn.functional.mse_loss(model.eval()(held_out), held_out["eda"]).item()
    before = loss_of()
    # 80% below the first loss and, except for naive, 80% below the best constant: it must have read its input
    goal = 0.2 * (before if name == "naive" else min(before, held_out["eda"].var(unbiased=False).item()))
    step = train_on_fresh_batches(model, lambda seed: learning_task(key, seed=seed), done=lambda: loss_of() < goal)
    assert loss_of() < goal, (before, loss_of(), goal, step)


# ---- every video model reads the EDA where a face would show it: the level in the appearance, its change in the motion

VIDEO = [(name, kw) for name, kw in VARIANTS if name not in ("naive", "landmarks")]


def eda_in_frames(seed, b=8, t=16, size=16):
    """Clips of a textured 'face' lit by exp(0.3 * level), the level being a random per-clip offset plus a change.
    The appearance shows the level; DeepPhys' normalised difference (x1 - x0) / (x1 + x0) = tanh(0.15 * change) shows
    the change, whatever the face and the level. The noise is relative to the light (additive noise would put the level
    into the differences too, through their noise energy, which grows as the face darkens)."""
    g = torch.Generator().manual_seed(seed)
    batch = example_batch(b, t, size, seed=seed)
    offset = 3 * (torch.randperm(b, generator=g) + torch.rand(b, generator=g)) / b - 1.5   # spread evenly over ±1.5
    level = offset[:, None] + smooth_series(g, b, t + 1)   # t + 1 samples: t differences
    face = torch.nn.functional.interpolate(torch.randn(b, 3, size // 4, size // 4, generator=g), size=(size, size),
                                           mode="bilinear", align_corners=False)
    frames = 0.3 * torch.exp(0.3 * level)[..., None, None, None] * (1 + 0.25 * face).clamp(0.5, 1.5)[:, None]
    frames = (frames * (1 + 0.05 * torch.randn(frames.shape, generator=g))).clamp(0, 1)
    diff = torch.stack([frame_difference(f) for f in frames])
    batch.update(frames=frames[:, :t], diff=diff / diff.std(), eda=level[:, :t])   # the dataset: / the train std
    return batch


def held_out_fit(model, batch):
    "The mean per-clip Pearson r of the model's prediction with batch['eda'], and its MSE / the target's variance."
    with torch.no_grad(): pred = model.eval()(batch)
    eda = batch["eda"]
    p, e = pred - pred.mean(1, keepdim=True), eda - eda.mean(1, keepdim=True)
    r = ((p * e).sum(1) / (p.norm(dim=1) * e.norm(dim=1)).clamp_min(1e-12)).mean().item()
    return r, (torch.nn.functional.mse_loss(pred, eda) / eda.var(unbiased=False)).item()


@pytest.mark.parametrize("name,kw", VIDEO, ids=[name + ("+bvp" if kw else "") for name, kw in VIDEO])
def test_video_model_reads_eda_level_and_changes(name, kw):
    """Trained on fresh clips, judged on held-out ones: the prediction must follow each clip's changes (r >= 0.8) and
    sit at each clip's level (MSE < 0.3 x the variance, of which the clips' own levels are about 60%)."""
    size = 32 if name.startswith("seqcnn") else 16      # seqcnn's five poolings need 32 px; the rest are cheaper at 16
    model = make(name, size=size, **kw)
    assert model.output == "level"                      # so its prediction is compared with the level as it is
    held_out = eda_in_frames(1000, size=size)
    good = lambda r, mse_over_var: r >= 0.8 and mse_over_var < 0.3
    step = train_on_fresh_batches(model, lambda seed: eda_in_frames(seed, size=size),
                                  lambda: good(*held_out_fit(model, held_out)), steps=150)
    r, mse_over_var = held_out_fit(model, held_out)
    assert good(r, mse_over_var), dict(r=r, mse_over_var=mse_over_var, steps=step)


@pytest.mark.parametrize("name,kw", [("seqcnn_bvp", {}), ("physnet", dict(use_bvp=True))])
def test_bvp_branch_is_wired_and_eda_is_not_read(name, kw):
    model = make(name, **kw).eval()
    batch = example_batch(batch=2, frames=16, size=32)
    with torch.no_grad():
        out = model(batch)
        assert not torch.allclose(out, model({**batch, "bvp": torch.zeros_like(batch["bvp"])}))
        assert torch.equal(out, model({**batch, "eda": torch.zeros_like(batch["eda"])}))   # the label is never an input


def test_deepphys_masks():
    model = make("deepphys").eval()
    masks = model.attention_masks(example_batch(batch=2, frames=3, size=32))
    assert [tuple(m.shape) for m in masks] == [(2, 3, 30, 30), (2, 3, 13, 13)]
    for m in masks:
        torch.testing.assert_close(m.sum((2, 3)), torch.full((2, 3), m.shape[2] * m.shape[3] / 2))
        assert (m > 0).all()
