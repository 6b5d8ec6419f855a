"""Adam, AdamW and AMSGrad against the implementations users migrate from.

References that run for real: torch.optim.Adam / AdamW.  References written here from the
published math, independent of optimlab: the CS224N AdamW (the handout's step(), with its
mul_/add_ moment updates) and Composer's DecoupledAdamW.  Tolerances: max |dp| <= 1e-6 in
float32 and <= 1e-12 in float64 over 500 steps, state compared to the same bound.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, max_param_diff, max_state_diff, run_lockstep, with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
ADAM_KEYS = {"step": "step", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
             "max_exp_avg_sq": "max_exp_avg_sq"}


# ------------------------------------------------------------------ literal references
class CS224NAdamW(torch.optim.Optimizer):
    """The CS224N default project's AdamW, written from the handout (seed 000/001)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                alpha = group["lr"]
                beta1, beta2 = group["betas"]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["correct_bias"]:
                    step_size = alpha * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                else:
                    step_size = alpha
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-alpha * group["weight_decay"])


class ComposerDecoupledAdamW(torch.optim.Optimizer):
    """Composer's DecoupledAdamW from its documented math: the decay factor is
    lr / initial_lr, applied to theta_{t-1}; then Adam with eps on sqrt(v_hat)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-5,
                 amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad))
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, initial_lr = group["lr"], group["initial_lr"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                if group["weight_decay"] != 0:
                    decay_factor = (lr / initial_lr) if initial_lr else 1.0
                    p.mul_(1 - decay_factor * group["weight_decay"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                    v = state["max_exp_avg_sq"]
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


# ------------------------------------------------------------------ the parity table
def _draws(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        yield dict(lr=10 ** rng.uniform(-3.5, -1.5),
                   betas=(rng.choice([0.0, 0.8, 0.9]), rng.choice([0.95, 0.99, 0.999])),
                   eps=rng.choice([1e-8, 1e-6, 1e-3]),
                   weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                   amsgrad=rng.random() < 0.5)


TORCH_ADAM = list(_draws(4, 0))
CASES = []
for kw in TORCH_ADAM:
    CASES += [
        ("Adam==torch.Adam", lambda p, kw=kw: optimlab.Adam(p, **kw),
         lambda p, kw=kw: torch.optim.Adam(p, **kw)),
        ("compat.torch.Adam", lambda p, kw=kw: compat.torch.Adam(p, **kw),
         lambda p, kw=kw: torch.optim.Adam(p, **kw)),
        ("Adam(decoupled)==torch.AdamW",
         lambda p, kw=kw: optimlab.Adam(p, **kw, wd_mode="decoupled"),
         lambda p, kw=kw: torch.optim.AdamW(p, **kw)),
        ("compat.torch.AdamW", lambda p, kw=kw: compat.torch.AdamW(p, **kw),
         lambda p, kw=kw: torch.optim.AdamW(p, **kw)),
        ("compat.torch.Adam(decoupled_weight_decay)",
         lambda p, kw=kw: compat.torch.Adam(p, **kw, decoupled_weight_decay=True),
         lambda p, kw=kw: torch.optim.Adam(p, **kw, decoupled_weight_decay=True)),
    ]
CASES += [
    ("AMSGrad==torch.Adam(amsgrad)", lambda p: optimlab.AMSGrad(p, lr=1e-2, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("compat.torch.Adam(maximize)", lambda p: compat.torch.Adam(p, lr=1e-2, maximize=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True)),
    ("compat.torch.AdamW defaults", lambda p: compat.torch.AdamW(p),
     lambda p: torch.optim.AdamW(p)),
]
for kw in [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, eps=1e-8, correct_bias=False,
                                                          weight_decay=0.01, betas=(0.8, 0.99))]:
    CASES += [
        ("AdamW==CS224N", lambda p, kw=kw: optimlab.AdamW(p, **kw),
         lambda p, kw=kw: CS224NAdamW(p, **kw)),
        ("compat.cs224n.AdamW", lambda p, kw=kw: compat.cs224n.AdamW(p, **kw),
         lambda p, kw=kw: CS224NAdamW(p, **kw)),
    ]
for kw in [dict(), dict(lr=1e-2, weight_decay=0.05), dict(lr=1e-2, weight_decay=0.05, amsgrad=True)]:
    CASES += [
        ("compat.composer.DecoupledAdamW",
         lambda p, kw=kw: compat.composer.DecoupledAdamW(p, **kw),
         lambda p, kw=kw: ComposerDecoupledAdamW(p, **kw)),
        ("AdamW(independent)==Composer",
         lambda p, kw=kw: optimlab.AdamW(p, **{"betas": (0.9, 0.95), "weight_decay": 1e-5,
                                              "eps": 1e-8, **kw},
                                         wd_mode="independent", eps_placement="sqrt_v_hat",
                                         wd_after_update=False),
         lambda p, kw=kw: ComposerDecoupledAdamW(p, **kw)),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,ours,ref", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_parity(name, ours, ref, dtype, impl):
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), ref, dtype=dtype, schedule=True)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, ADAM_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[0]]["step"] == 500


# ------------------------------------------------------------------ identities
def test_adamw_without_decay_is_adam_with_the_same_eps_placement():
    pa, oa, pb, ob = run_lockstep(lambda p: optimlab.AdamW(p, lr=1e-2),
                                  lambda p: optimlab.Adam(p, lr=1e-2, eps=1e-6,
                                                          eps_placement="sqrt_v"))
    assert max_param_diff(pa, pb) == 0.0


def test_amsgrad_equals_adam_under_constant_gradients():
    # with a constant gradient v_t = (1 - beta2^t) g^2 only grows, so max(v) = v
    pa = [torch.ones(4, requires_grad=True)]
    pb = [torch.ones(4, requires_grad=True)]
    oa, ob = optimlab.AMSGrad(pa, lr=1e-2), optimlab.Adam(pb, lr=1e-2)
    for _ in range(200):
        for p in pa + pb:
            p.grad = torch.full_like(p, 0.3)
        oa.step()
        ob.step()
    assert max_param_diff(pa, pb) == 0.0


def test_eps_placements_differ_early_and_agree_when_eps_is_zero():
    kw = dict(lr=1e-2, eps=1e-3)
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.Adam(p, **kw, eps_placement="sqrt_v"),
                                lambda p: optimlab.Adam(p, **kw, eps_placement="sqrt_v_hat"),
                                steps=5, scale=1e-3, pull=0.0)
    assert max_param_diff(pa, pb) > 1e-4
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.Adam(p, lr=1e-2, eps=0.0, eps_placement="sqrt_v"),
                                lambda p: optimlab.Adam(p, lr=1e-2, eps=0.0), steps=50,
                                dtype=torch.float64)
    assert max_param_diff(pa, pb) <= 1e-12


def test_wd_after_update_is_the_cs224n_order_and_differs_from_torch():
    # (1 - lr*wd)(theta - s) vs (1 - lr*wd) theta - s differ by lr*wd*s each step
    kw = dict(lr=1e-1, weight_decay=0.5, eps=1e-8, eps_placement="sqrt_v_hat", wd_mode="decoupled")
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.Adam(p, **kw, wd_after_update=True),
                                lambda p: torch.optim.AdamW(p, lr=1e-1, weight_decay=0.5),
                                steps=20)
    assert max_param_diff(pa, pb) > 1e-4


def test_independent_decay_ignores_the_peak_lr():
    """Same schedule multiplier, two peak lrs, no gradient: independent decay shrinks the
    weights identically, decoupled (torch) decay does not."""
    def decay_only(lr, mode):
        p = torch.ones(3, requires_grad=True)
        opt = optimlab.AdamW([p], lr=lr, weight_decay=0.1, wd_mode=mode)
        for t in range(10):
            opt.param_groups[0]["lr"] = lr * (1 - t / 10)
            p.grad = torch.zeros_like(p)
            opt.step()
        return p.detach()
    assert torch.equal(decay_only(1e-3, "independent"), decay_only(1e-1, "independent"))
    assert not torch.allclose(decay_only(1e-3, "decoupled"), decay_only(1e-1, "decoupled"))


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=0.9), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(wd_mode="l1"), "wd_mode"),
    (dict(eps_placement="inside"), "eps_placement"), (dict(nonfinite="zero"), "nonfinite"),
])
@pytest.mark.parametrize("cls", [optimlab.Adam, optimlab.AdamW, optimlab.AMSGrad])
def test_bad_arguments_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_override_is_rejected():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="eps"):
        optimlab.AdamW([{"params": [p]}, {"params": [q], "eps": -1.0}])


def test_compat_rejects_unsupported_flags():
    with pytest.raises(ValueError, match="capturable"):
        compat.torch.Adam([torch.zeros(2, requires_grad=True)], capturable=True)


def test_adamw_state_keys_and_defaults():
    p = torch.zeros(3, requires_grad=True)
    opt = optimlab.AdamW([p])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["correct_bias"]) == \
        (1e-3, (0.9, 0.999), 1e-6, 0.0, True)
    p.grad = torch.ones(3)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
