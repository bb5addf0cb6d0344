import pytest
import torch
from torch import nn

from distdm.engine import Schedule, model_state, predict, select, train_variants
from distdm.errors import DistdmError
from distdm.models import build_model


def _toy(n=96, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_variants_equal_separate_runs(optimizer):
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=3, lr=0.05, batch_size=16, optimizer=optimizer, seed=3)
    w = torch.ones(4, len(y))
    w[1, :10] = 0
    w[2, 50:] = 0
    w[3] = torch.rand(len(y), generator=torch.Generator().manual_seed(0))
    batched = train_variants(model, x, y, s, weights=w, strategy="vmap").states
    for v in range(4):
        single = train_variants(model, x, y, s, weights=w[v : v + 1], strategy="loop").states
        for k in single:
            torch.testing.assert_close(batched[k][v], single[k][0], atol=1e-5, rtol=1e-4)


def test_chunking_does_not_change_results():
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=2, lr=0.05, batch_size=16)
    w = (torch.rand(5, len(y), generator=torch.Generator().manual_seed(1)) > 0.3).float()
    a = train_variants(model, x, y, s, weights=w).states
    b = train_variants(model, x, y, s, weights=w, chunk_size=2).states
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_masked_out_sample_has_no_effect():
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=2, lr=0.1, batch_size=16)
    w = torch.ones(1, len(y))
    w[0, 7] = 0
    base = train_variants(model, x, y, s, weights=w).states
    x2 = x.clone()
    x2[7] = 1e3  # anything at all in the masked sample
    y2 = y.clone()
    y2[7] = (y[7] + 1) % 3
    moved = train_variants(model, x2, y2, s, weights=w).states
    for k in base:
        torch.testing.assert_close(base[k], moved[k])


def test_trajectory_records_every_epoch_and_starts_at_init():
    x, y = _toy()
    model = build_model("logreg", (8,), 3, seed=0)
    init = model_state(model)
    r = train_variants(model, x, y, Schedule(epochs=4, lr=0.1, batch_size=32), record=True)
    assert len(r.trajectory) == 5
    torch.testing.assert_close(select(r.trajectory[0], 0)["head.weight"], init["head.weight"])
    torch.testing.assert_close(r.trajectory[-1]["head.weight"], r.states["head.weight"])


def test_full_batch_sgd_step_matches_closed_form():
    # one full-batch SGD step of logistic regression with sum reduction: W <- W - lr * sum_i g_i
    x, y = _toy(n=10, d=4, classes=2)
    model = build_model("logreg", (4,), 2, seed=0)
    s = Schedule(epochs=1, lr=0.3, batch_size=None, shuffle=False)
    out = train_variants(model, x, y, s, reduction="sum").states
    w0, b0 = model.head.weight.detach(), model.head.bias.detach()
    p = torch.softmax(x @ w0.T + b0, -1)
    err = p - torch.nn.functional.one_hot(y, 2).float()
    torch.testing.assert_close(out["head.weight"][0], w0 - 0.3 * err.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["head.bias"][0], b0 - 0.3 * err.sum(0), atol=1e-5, rtol=1e-5)


def test_batchnorm_model_falls_back_to_loop_and_matches():
    x, y = _toy()
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    s = Schedule(epochs=1, lr=0.05, batch_size=32)
    w = torch.ones(2, len(y))
    w[1, :5] = 0
    r = train_variants(model, x, y, s, weights=w)
    assert r.states["1.running_mean"].shape == (2, 8)
    out = predict(model, r.states, x[:4])
    assert out.shape == (2, 4, 3)
    assert not torch.allclose(r.states["1.running_mean"][0], r.states["1.running_mean"][1])


def test_bad_weights_are_rejected():
    x, y = _toy()
    model = build_model("logreg", (8,), 3)
    with pytest.raises(DistdmError, match="weights must have shape"):
        train_variants(model, x, y, Schedule(epochs=1), weights=torch.ones(2, 5))
    with pytest.raises(DistdmError, match=">= 0"):
        train_variants(model, x, y, Schedule(epochs=1), weights=-torch.ones(1, len(y)))
    with pytest.raises(DistdmError, match="learning rate"):
        Schedule(lr=-1.0)
