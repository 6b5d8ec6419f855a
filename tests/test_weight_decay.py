"""Weight decay's one vocabulary (issue 15): every ``wd_mode`` on every optimizer and path.

* A literal re-statement: with zero gradients only the decay acts, so after T steps under a
  schedule theta_T = theta_0 prod_t (1 - c_t), with c_t written out from the table in
  `optimlab._common` (float64: 1e-12).
* With gradients: each mode equals ``decoupled`` (torch's form) given, at every step, the
  lambda that makes the same shrink, c_t / eta_t; and ``timescale`` tau equals ``independent``
  1 / tau (the same arithmetic: bit for bit).
"""

from __future__ import annotations

import pytest
import torch

import optimlab
from tests.helpers import IMPLS, with_impl

NAMES = optimlab.list_optimizers()
SHRINKS = [m for m in optimlab.WD_MODES if m != "l2"]
LR0 = 0.1
MULTIPLIERS = [1.0, 0.8, 0.5, 0.3, 0.2, 0.1]           # the schedule s_t, one per step
WD = {"timescale": 4.0}                                  # tau, in updates
WD_DEFAULT = 0.3


def literal_shrink(mode: str, wd: float, lr: float, lr0: float) -> float:
    """c in theta <- theta - c theta: the README's table, written out once more."""
    s = lr / lr0
    return {"decoupled": lr * wd, "independent": s * wd, "lr_squared": lr * lr / lr0 * wd,
            "absolute": wd, "timescale": s / wd}[mode]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
            for s in ((5, 3), (7,), (2, 3, 4))]


def _make(name, params, mode, impl, **kw):
    kw.setdefault("weight_decay", WD.get(mode, WD_DEFAULT))
    opt = optimlab.create_optimizer(params, name, lr=LR0, wd_mode=mode, **kw)
    return with_impl(lambda _: opt, impl)(params)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", SHRINKS)
@pytest.mark.parametrize("name", NAMES)
def test_each_mode_shrinks_as_its_formula_says(name, mode, impl):
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = _make(name, params, mode, impl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: MULTIPLIERS[min(t, 5)])
    wd = WD.get(mode, WD_DEFAULT)
    factor = 1.0
    for t in range(len(MULTIPLIERS)):
        factor *= 1 - literal_shrink(mode, wd, LR0 * MULTIPLIERS[t], LR0)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    for p, p0 in zip(params, start):
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-12, atol=1e-12)


def _train(opt, params, sched, steps, set_wd=None):
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if set_wd is not None:
            set_wd(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
        opt.step()
        sched.step()


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("mode", [m for m in SHRINKS if m != "decoupled"])
@pytest.mark.parametrize("name", NAMES)
def test_each_mode_is_decoupled_decay_with_its_per_step_lambda(name, mode, after):
    """With gradients, momentum and the decay before or after the update: mode M with lambda
    equals torch's decoupled form given lambda_t = c_t / eta_t at each step (float64, up to the
    rounding of that product)."""
    wd = WD.get(mode, WD_DEFAULT)
    pa, pb = _params(), _params()
    oa = _make(name, pa, mode, "reference", wd_after_update=after)
    ob = _make(name, pb, "decoupled", "reference", wd_after_update=after)
    lam = lambda t: MULTIPLIERS[min(t, 5)]                                  # noqa: E731
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lam)
    sb = torch.optim.lr_scheduler.LambdaLR(ob, lam)

    def set_wd(t):
        lr = LR0 * MULTIPLIERS[t]
        for group in ob.param_groups:
            group["weight_decay"] = literal_shrink(mode, wd, lr, LR0) / lr

    _train(oa, pa, sa, len(MULTIPLIERS))
    _train(ob, pb, sb, len(MULTIPLIERS), set_wd)
    moved = max((a - a0).abs().max().item() for a, a0 in zip(pa, _params()))
    assert moved > 1e-2
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_timescale_tau_is_independent_decay_one_over_tau(name):
    pa, pb = _params(), _params()
    oa = _make(name, pa, "timescale", "auto", weight_decay=8.0)
    ob = _make(name, pb, "independent", "auto", weight_decay=1 / 8.0)
    for opt, params in ((oa, pa), (ob, pb)):
        _train(opt, params, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: MULTIPLIERS[min(t, 5)]), len(MULTIPLIERS))
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_timescale_zero_means_no_decay_and_a_negative_tau_is_refused():
    pa, pb = _params(), _params()
    oa = optimlab.AdamW(pa, lr=LR0, weight_decay=0.0, wd_mode="timescale")
    ob = optimlab.AdamW(pb, lr=LR0, weight_decay=0.0)
    for opt, params in ((oa, pa), (ob, pb)):
        _train(opt, params, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0), 3)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    with pytest.raises(ValueError, match="weight_decay"):
        optimlab.AdamW(_params(), weight_decay=-1.0, wd_mode="timescale")
    with pytest.raises(ValueError, match="timescale.*tau"):          # a lambda passed as tau
        optimlab.AdamW(_params(), weight_decay=0.01, wd_mode="timescale")
    with pytest.raises(ValueError, match="wd_mode.*'lr_squared'"):
        optimlab.AdamW(_params(), weight_decay=0.1, wd_mode="squared")
