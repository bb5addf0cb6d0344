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


# --- the optimizer, skipped batches, memory budget, executors, predict --------------------------


def _torch_reference(model, x, y, s, keep=None):
    """Plain PyTorch training: nn.Module forward, F.cross_entropy (mean), torch.optim; batches in the
    engine's shuffle order, restricted to kept samples, and a batch with none kept is skipped."""
    import copy

    from distdm.engine import batch_order

    m = copy.deepcopy(model)
    if s.optimizer == "adam":
        opt = torch.optim.Adam(m.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    for batches in batch_order(len(y), s):
        for idx in batches:
            if keep is not None:
                idx = idx[keep[idx]]
            if len(idx) == 0:
                continue
            loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize(
    "opt",
    [dict(optimizer="sgd"), dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3), dict(optimizer="adam")],
)
def test_one_variant_trains_as_plain_torch(strategy, opt):
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=2, hidden=(16,))
    lr = 0.01 if opt["optimizer"] == "adam" else 0.05
    s = Schedule(epochs=3, lr=lr, batch_size=16, seed=5, **opt)
    ours = train_variants(model, x, y, s, strategy=strategy).states
    ref = _torch_reference(model, x, y, s)
    for k in ref:
        torch.testing.assert_close(ours[k][0], ref[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("opt", [dict(momentum=0.9, weight_decay=1e-2), dict(optimizer="adam")])
def test_variant_with_nothing_kept_in_a_batch_skips_it(opt):
    # variant 1 keeps nothing in the first batch: it takes no step (no momentum, no Adam moment)
    # there, exactly as plain training on the data without those samples; other variants in the
    # same chunk do step, and chunking or strategy do not change anything.
    x, y = _toy(n=64)
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(
        epochs=2, lr=0.01 if opt.get("optimizer") == "adam" else 0.05, batch_size=16, shuffle=False, **opt
    )
    w = torch.ones(3, 64)
    w[1, :16] = 0
    w[2, 40:] = 0
    batched = train_variants(model, x, y, s, weights=w, strategy="vmap").states
    looped = train_variants(model, x, y, s, weights=w, strategy="loop").states
    chunked = train_variants(model, x, y, s, weights=w, strategy="vmap", chunk_size=1).states
    for v in range(3):
        ref = _torch_reference(model, x, y, s, keep=w[v] > 0)
        for k in ref:
            for got in (batched, looped, chunked):
                torch.testing.assert_close(got[k][v], ref[k], atol=1e-6, rtol=1e-5)


class _CountingExecutor:
    """Runs chunks in-process and records how many it was given."""

    def __init__(self):
        self.calls: list[int] = []

    def map(self, fn, items):
        items = list(items)
        self.calls.append(len(items))
        return [fn(i) for i in items]


def test_memory_budget_sets_chunks_and_keeps_results():
    from distdm.engine import estimate_variant_bytes

    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=2, lr=0.05, batch_size=16)
    w = (torch.rand(8, len(y), generator=torch.Generator().manual_seed(1)) > 0.3).float()
    per = estimate_variant_bytes(model, x, y, s)
    assert per > sum(p.numel() * 4 for p in model.parameters())
    full = train_variants(model, x, y, s, weights=w).states
    counts = []
    for budget in (per * 100, per * 4, per * 3, per):
        ex = _CountingExecutor()
        got = train_variants(model, x, y, s, weights=w, memory_budget_bytes=budget, executor=ex).states
        counts.append(ex.calls[0])
        for k in full:
            torch.testing.assert_close(got[k], full[k])
    assert counts == [1, 2, 3, 8]
    with pytest.raises(DistdmError, match="memory_budget_bytes"):
        train_variants(model, x, y, s, weights=w, memory_budget_bytes=per - 1)
    with pytest.raises(DistdmError, match="not both"):
        train_variants(model, x, y, s, weights=w, memory_budget_bytes=per, chunk_size=2)


def test_memory_estimate_grows_with_model_batch_and_optimizer_state():
    from distdm.engine import estimate_variant_bytes

    x, y = _toy()
    small = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    big = build_model("mlp", (8,), 3, seed=1, hidden=(256,))
    s = Schedule(epochs=2, lr=0.05, batch_size=16)
    base = estimate_variant_bytes(small, x, y, s)
    assert estimate_variant_bytes(big, x, y, s) > base
    assert estimate_variant_bytes(small, x, y, Schedule(epochs=2, batch_size=64)) > base
    assert estimate_variant_bytes(small, x, y, Schedule(epochs=2, batch_size=16, optimizer="adam")) > base
    assert estimate_variant_bytes(small, x, y, s, record=True) > base


def test_executor_gets_one_item_per_chunk_and_order_is_kept():
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=1, lr=0.05, batch_size=16)
    w = (torch.rand(5, len(y), generator=torch.Generator().manual_seed(2)) > 0.5).float()
    ex = _CountingExecutor()
    got = train_variants(model, x, y, s, weights=w, chunk_size=2, executor=ex).states
    assert ex.calls == [3]
    ref = train_variants(model, x, y, s, weights=w).states
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_predict_vmap_equals_loop_and_chunks():
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    w = (torch.rand(3, len(y), generator=torch.Generator().manual_seed(3)) > 0.5).float()
    states = train_variants(model, x, y, Schedule(epochs=1, lr=0.1, batch_size=32), weights=w).states
    a = predict(model, states, x, strategy="vmap")
    b = predict(model, states, x, strategy="loop", chunk=7)
    assert a.shape == (3, len(y), 3)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])
    assert model.training  # predict restores the mode


def test_bad_chunk_and_reduction_are_rejected():
    x, y = _toy()
    model = build_model("logreg", (8,), 3)
    with pytest.raises(DistdmError, match="chunk_size"):
        train_variants(model, x, y, Schedule(epochs=1), chunk_size=0)
    with pytest.raises(DistdmError, match="reduction"):
        train_variants(model, x, y, Schedule(epochs=1), reduction="median")


def test_traced_gradient_replays_the_eager_one(monkeypatch):
    import distdm.engine as engine

    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=2, lr=0.05, batch_size=40, momentum=0.5)  # batch sizes 40, 40, 16
    w = (torch.rand(3, len(y), generator=torch.Generator().manual_seed(4)) > 0.2).float()
    eager = train_variants(model, x, y, s, weights=w, strategy="vmap").states
    traced_sizes = []
    real_trace = engine._trace

    def spy(fn, args):
        traced_sizes.append(args[2].shape[0])
        return real_trace(fn, args)

    monkeypatch.setattr(engine, "TRACE_MIN_STEPS", 3)
    monkeypatch.setattr(engine, "_trace", spy)
    traced = train_variants(model, x, y, s, weights=w, strategy="vmap").states
    assert traced_sizes == [40]  # size 40 occurs 4 times, size 16 twice
    for k in eager:
        torch.testing.assert_close(traced[k], eager[k])


def test_out_of_memory_under_vmap_is_not_swallowed_by_the_loop_fallback(monkeypatch):
    """A vmap chunk that runs out of memory raises a DistdmError saying what to lower, instead of
    silently retraining every variant in a loop; other vmap failures still fall back."""
    import distdm.engine as engine

    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    w = torch.ones(2, len(y))
    real = engine._train_chunk
    calls = []

    def failing(job, chunk, strategy, error):
        calls.append(strategy)
        if strategy == "vmap":
            raise error
        return real(job, chunk, strategy)

    schedule = Schedule(epochs=1, lr=0.1, batch_size=32)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "_train_chunk", lambda j, c, s: failing(j, c, s, oom))
    with pytest.raises(DistdmError, match="out of memory while training.*memory_budget_bytes"):
        train_variants(model, x, y, schedule, weights=w, strategy="vmap")
    assert calls == ["vmap"]
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(engine, "_train_chunk", lambda j, c, s: failing(j, c, s, cpu_oom))
    with pytest.raises(DistdmError, match="out of memory"):
        train_variants(model, x, y, schedule, weights=w, strategy="vmap")
    calls.clear()
    other = RuntimeError("vmap: It looks like you're calling .item() on a Tensor")
    monkeypatch.setattr(engine, "_train_chunk", lambda j, c, s: failing(j, c, s, other))
    states = train_variants(model, x, y, schedule, weights=w, strategy="vmap").states
    assert calls == ["vmap", "loop"] and next(iter(states.values())).shape[0] == 2
