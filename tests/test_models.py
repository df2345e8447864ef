"Every registered model: shapes, gradients, clip lengths, determinism, autocast, and that it can learn."
import math

import pytest
import torch

from edanb.dataset import frame_difference
from edanb.models import MODELS, count_parameters, create_model, example_batch

# the model zoo's registry, plus the BVP variant of physnet
VARIANTS = [(name, {}) for name in MODELS] + [("physnet", dict(use_bvp=True))]
IDS = [name + ("+bvp" if kw else "") for name, kw in VARIANTS]


def make(name, **kw):
    torch.manual_seed(0)
    return create_model(name, size=32, **kw)


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
    for name in MODELS:
        if name == "naive": continue
        assert count_parameters(create_model(name, "paper")) > count_parameters(create_model(name, "tiny")), name


# ---- each model learns a simple function of its input: catches wiring errors that shape tests miss ----

def smooth_series(g, b, t, cycles=1.5):
    phase = 2 * math.pi * torch.rand(b, 1, generator=g)
    return torch.sin(phase + torch.linspace(0, 2 * math.pi * cycles, t))


def learning_task(name, seed=0, b=8, t=16, size=32):
    "A batch whose 'eda' is a simple function of the input the model is meant to read (everything else is noise)."
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
    else:                                                 # frame brightness follows the target
        level = smooth_series(g, b, t + 1)
        frames = (0.5 + 0.3 * level[..., None, None, None]).expand(-1, -1, 3, size, size)
        frames = (frames + 0.02 * torch.randn(frames.shape, generator=g)).clamp(0, 1)
        batch["frames"], batch["diff"] = frames[:, :t], torch.stack([frame_difference(f) for f in frames])
        # DeepPhys predicts from its motion branch (appearance only gates it): its target is the motion
        batch["eda"] = batch["diff"].mean((2, 3, 4)) * 20 if name == "deepphys" else level[:, :t]
    return batch


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_learns_a_simple_target(name, kw):
    "Trained on fresh batches, judged on a held-out one: memorising the training batches cannot pass."
    key = name + ("+bvp" if kw else "")
    model = make(name, **kw)
    held_out = learning_task(key, seed=1000)
    loss_of = lambda: torch.nn.functional.mse_loss(model.eval()(held_out), held_out["eda"]).item()
    before = loss_of()
    # 80% below the first loss and, except for naive, 80% below the best constant: it must have read its input
    goal = 0.2 * (before if name == "naive" else min(before, held_out["eda"].var(unbiased=False).item()))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, 301):
        batch = learning_task(key, seed=step)
        model.train(); opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch), batch["eda"]).backward()
        opt.step()
        if step % 25 == 0 and loss_of() < goal: break
    assert loss_of() < goal, (before, loss_of(), goal, step)


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
