"""The one training loop (`optimlab.loop.Fit`), which ``optimlab train`` and the lab's `fit` run,
and the registry's training defaults that both build their optimizers from."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import optimlab
from optimlab import loop
from optimlab.lab._data import fit as lab_fit
from optimlab.registry import create_optimizer, get_spec, list_optimizers
from optimlab.train import default_lr


def _problem(seed=0, n=37, dim=6):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, x, y


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _fit(model, x, y, *, epochs=3, batch=8, seed=5, position=None, should_stop=None):
    opt = optimlab.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    total = loop.updates_per_epoch(len(x), batch) * epochs
    sched = loop.schedule(opt, total=total, warmup=loop.warmup_updates(0.2, total))
    f = loop.Fit(model, opt, sched, epochs=epochs,
                 plan=lambda e: loop.epoch_batches([1] * len(x), batch, seed, e,
                                                   group_by_length=False),
                 micro_batches=lambda idx: ([(x[idx], y[idx])], len(idx)), loss_fn=_loss,
                 max_grad_norm=1.0, position=position)
    return f, opt, sched


def test_fit_is_the_loop_it_says_it_is():
    """A literal statement of the loop: the seeded epoch orders, one update per batch
    (`accumulate_and_step`, itself tested against the literal SAM/accumulation math), the
    LambdaLR of lr_multiplier after each, the epoch's mean loss."""
    model, x, y = _problem()
    ref = copy.deepcopy(model)
    f, _, _ = _fit(model, x, y)
    records = []
    assert f.run(on_epoch_end=lambda fit, r: records.append(r)) == "finished"

    opt = optimlab.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    total = math.ceil(37 / 8) * 3
    warm = round(0.2 * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: loop.lr_multiplier(t, total=total, warmup=warm, schedule="linear"))
    for epoch in range(3):
        g = torch.Generator().manual_seed(((5 & 0xFFFFFFFF) << 20) + epoch)
        perm = torch.randperm(37, generator=g).tolist()
        total_loss = 0.0
        for s in range(0, 37, 8):
            idx = perm[s:s + 8]
            loss = optimlab.accumulate_and_step(ref, opt, [(x[idx], y[idx])], _loss,
                                                max_grad_norm=1.0)
            sched.step()
            total_loss += loss * len(idx)
        assert records[epoch].train_loss == total_loss / 37
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_stop_in_the_middle_of_an_epoch_resumes_to_the_same_weights():
    model, x, y = _problem()
    f, opt, sched = _fit(copy.deepcopy(model), x, y)
    assert f.run() == "finished"
    full = [p.detach().clone() for p in f.model.parameters()]

    a, _, _ = _fit(copy.deepcopy(model), x, y)
    assert a.run(should_stop=lambda fit, loss: fit.pos.step == 7) == "stopped"
    assert a.pos.epoch == 1 and a.pos.step_in_epoch == 2 and a.pos.batches is not None
    saved = copy.deepcopy(a.state_dict())
    b, _, _ = _fit(copy.deepcopy(model), x, y)
    b.load_state_dict(saved)
    assert b.run() == "finished"
    for p, q in zip(b.model.parameters(), full):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_a_non_finite_loss_ends_the_run_as_diverged():
    model, x, y = _problem()
    x = x.clone()
    x[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        res = lab_fit(model, optimlab.SGD(model.parameters(), lr=0.1),
                      lambda idx: (x[idx], y[idx]), len(x), epochs=3, batch_size=8, seed=5,
                      loss_fn=_loss)
    assert res.diverged and len(res.epochs) == 1 and not math.isfinite(res.step_losses[-1])


def test_the_registry_owns_each_optimizers_training_defaults():
    """`optimlab train`, the lab and your own loop build an optimizer the same way: the
    registry's defaults, its ``scheduled`` options for a loop whose lr schedule sets the step
    (Adafactor's relative step and parameter scale off), its default learning rates."""
    for name in list_optimizers():
        spec = get_spec(name)
        assert default_lr(name, "full-model") == spec.lr_full_model
        assert default_lr(name, "last-linear-layer") == spec.lr_head
    model = torch.nn.Linear(4, 3)
    ada = create_optimizer(model, "adafactor", lr=1e-3, scheduled=True)
    assert ada.param_groups[0]["relative_step"] is False
    assert ada.param_groups[0]["scale_parameter"] is False
    assert create_optimizer(model, "adafactor").param_groups[0]["relative_step"] is True
    sam = create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, sam=dict(rho=0.1))
    assert isinstance(sam, optimlab.SAM) and isinstance(sam.base_optimizer, optimlab.AdamW)
    assert [g["weight_decay"] for g in sam.param_groups] == [0.1, 0.0]


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    from optimlab._run import atomic_write
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
