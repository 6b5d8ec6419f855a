"""Behaviour every registered optimizer shares: closure, skipped parameters, sparse and
non-finite gradients, state_dict round trips and layout checks, the dtype policy on load,
initial_lr and lr schedulers, bad arguments."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import optimlab
from optimlab import compat

NAMES = optimlab.list_optimizers()
# options that make each optimizer keep all the state it can (momentum buffers, max v, ...)
FULL = {"sgd": dict(momentum=0.9, nesterov=True), "sgdw": dict(momentum=0.9, weight_decay=0.1),
        "rmsprop": dict(momentum=0.9, centered=True), "adam": dict(amsgrad=True),
        "adafactor": dict(beta1=0.9), "adamw": dict(weight_decay=0.1),
        "adagrad": dict(lr_decay=0.01)}


def make(name, params, **kwargs):
    return optimlab.create_optimizer(params, name, lr=1e-2, **{**FULL.get(name, {}), **kwargs})


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 3)).to(dtype)


def train(net, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g).to(next(net.parameters()).dtype)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()

        def closure():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            loss.backward()
            return loss
        opt.step(closure)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_registry_lists_the_family():
    assert set(NAMES) >= {"sgd", "adagrad", "rmsprop", "adam", "adamw", "amsgrad", "radam",
                          "adafactor"}
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
        optimlab.create_optimizer([torch.zeros(1, requires_grad=True)], "lion")


@pytest.mark.parametrize("name", NAMES)
def test_step_returns_the_closure_loss_and_trains(name):
    net = model()
    opt = make(name, net)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    first = closure().item()
    for _ in range(60):
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert closure().item() < first


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_skipped(name):
    a, b = torch.ones(3, 2, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = make(name, [a, b])
    a.grad = torch.full_like(a, 0.5)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and len(opt.state[b]) == 0
    assert not torch.equal(a, torch.ones(3, 2))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_a_clear_error(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make(name, emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_skips_the_whole_step(name, bad):
    net = model()
    opt = make(name, net)
    train(net, opt, 3)
    before = [p.detach().clone() for p in net.parameters()]
    state = roundtrip(opt.state_dict())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    next(net.parameters()).grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    after = opt.state_dict()["state"]
    for pid, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[pid][k])), (pid, k)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_raise_and_ignore(name):
    p = torch.ones(2, 2, requires_grad=True)
    opt = make(name, [p], nonfinite="raise")
    p.grad = torch.tensor([[1.0, float("nan")], [1.0, 1.0]])
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        opt.step()
    assert torch.equal(p, torch.ones(2, 2))
    opt = make(name, [p], nonfinite="ignore")      # torch.optim's behaviour: no check at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not torch.isfinite(p).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_identical(name):
    net = model()
    opt = make(name, net, weight_decay=0.01)
    train(net, opt, 7, seed=1)
    saved_model, saved_opt = roundtrip(net.state_dict()), roundtrip(opt.state_dict())
    train(net, opt, 8, seed=2)

    net2 = model(seed=123)                         # different init, overwritten by the load
    net2.load_state_dict(saved_model)
    opt2 = make(name, net2, weight_decay=0.01)
    opt2.load_state_dict(saved_opt)
    train(net2, opt2, 8, seed=2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for k, v in sa["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][pid][k]))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_for_another_layout_is_rejected(name):
    net = model()
    opt = make(name, net.parameters())
    train(net, opt, 2)
    sd = opt.state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.LayerNorm(4),
                                torch.nn.Linear(3, 8))       # same count, other shapes
    opt2 = make(name, other.parameters())
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(sd)
    opt3 = make(name, list(net.parameters())[:-1])
    with pytest.raises(ValueError, match="parameters"):
        opt3.load_state_dict(sd)


@pytest.mark.parametrize("name", NAMES)
def test_load_keeps_saved_state_dtype(name):
    """Policy: state keeps the dtype it was saved with (torch.optim casts to the param's)."""
    net = model()
    opt = make(name, net)
    train(net, opt, 3)
    sd = roundtrip(opt.state_dict())
    net16 = model(dtype=torch.bfloat16)
    opt16 = make(name, net16)
    opt16.load_state_dict(sd)
    for p in net16.parameters():
        for k, v in opt16.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, (k, v.dtype)
    train(net16, opt16, 2)                               # and it keeps training
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in net16.parameters())


TORCH_MIGRATIONS = [
    (compat.torch.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (compat.torch.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (compat.torch.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    (compat.torch.Adagrad, torch.optim.Adagrad, dict(lr=1e-2)),
    (compat.torch.RMSprop, torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
    (compat.torch.RAdam, torch.optim.RAdam, dict(lr=1e-2)),
]


@pytest.mark.parametrize("ours,theirs,kw", TORCH_MIGRATIONS,
                         ids=[t.__name__ for _, t, _ in TORCH_MIGRATIONS])
def test_a_torch_optim_checkpoint_resumes_in_optimlab(ours, theirs, kw):
    net = model()
    ref = theirs(net.parameters(), **kw)
    train(net, ref, 5)
    saved_model, saved_opt = roundtrip(net.state_dict()), roundtrip(ref.state_dict())
    train(net, ref, 10, seed=2)
    net2 = model()
    net2.load_state_dict(saved_model)
    opt = ours(net2.parameters(), **kw)
    opt.load_state_dict(saved_opt)
    train(net2, opt, 10, seed=2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_initial_lr_is_kept_and_schedulers_drive_lr(name):
    net = model()
    opt = make(name, net, weight_decay=0.01)
    assert all(g["initial_lr"] == 1e-2 for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(net, opt, 1)
    sched.step()
    sched.step()
    assert all(abs(g["lr"] - 2.5e-3) < 1e-15 and g["initial_lr"] == 1e-2
               for g in opt.param_groups)
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 0.3})
    assert opt.param_groups[-1]["initial_lr"] == 0.3


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments(name):
    p = [torch.zeros(2, 2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        optimlab.create_optimizer(p, name, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        optimlab.create_optimizer(p, name, weight_decay=-1.0)
    with pytest.raises(ValueError, match="wd_mode"):
        optimlab.create_optimizer(p, name, wd_mode="sometimes")
    with pytest.raises(ValueError, match="nonfinite"):
        optimlab.create_optimizer(p, name, nonfinite="zero")


def test_weight_decay_groups_leave_out_biases_and_norms():
    net = model()
    groups = optimlab.param_groups_weight_decay(net, 0.1)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0
    opt = optimlab.create_optimizer(net, "adamw", lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    opt = optimlab.create_optimizer(net, "adamw", weight_decay=0.1, filter_bias_and_norm=False)
    assert len(opt.param_groups) == 1


def test_load_state_dict_of_something_else_is_a_clear_error():
    opt = optimlab.AdamW([torch.nn.Parameter(torch.ones(2))])
    for bad in ({}, {"state": {}}, [1, 2]):
        with pytest.raises(ValueError, match="not an optimizer state dict"):
            opt.load_state_dict(bad)
