"""AdaGrad against torch.optim.Adagrad (running for real) and against Duchi et al.'s diagonal
algorithm written here from the paper (keeping every past gradient).  Tolerances: max |dp|
<= 1e-6 in float32 and <= 1e-12 in float64 over 500 steps, state compared to the same bound.
"""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, max_param_diff, max_state_diff, run_lockstep, with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
ADAGRAD_KEYS = {"step": "step", "sum": "sum"}


# ------------------------------------------------------------------ literal reference
class DuchiDiagonalAdaGrad(torch.optim.Optimizer):
    """Duchi, Hazan & Singer (2011), Figure 1 with diagonal H_t = delta I + diag(s_t),
    s_{t,i} = ||g_{1:t,i}||_2, no regularizer: theta_{t+1} = theta_t - eta_t H_t^{-1} g_t.
    The full history g_{1:t} is kept and its norm taken afresh every step.  torch's two
    additions are written in as well: s_0 (a virtual first row sqrt(s_0) of g_{1:t}) and
    eta_t = eta / (1 + (t-1) gamma)."""

    def __init__(self, params, lr, eps, lr_decay=0.0, initial_accumulator_value=0.0):
        super().__init__(params, dict(lr=lr, eps=eps, lr_decay=lr_decay,
                                      initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["history"] = [torch.full_like(
                        p, math.sqrt(group["initial_accumulator_value"]))]
                state["history"].append(p.grad.clone())
                t = len(state["history"]) - 1
                s_t = torch.linalg.vector_norm(torch.stack(state["history"]), dim=0)
                eta_t = group["lr"] / (1 + (t - 1) * group["lr_decay"])
                p.sub_(eta_t * p.grad / (group["eps"] + s_t))


# ------------------------------------------------------------------ the parity table
def _draws(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        yield dict(lr=10 ** rng.uniform(-2.5, -0.5), lr_decay=rng.choice([0.0, 1e-3, 0.1]),
                   weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                   initial_accumulator_value=rng.choice([0.0, 0.1, 1.0]),
                   eps=rng.choice([1e-10, 1e-6, 1e-2]), maximize=rng.random() < 0.25)


TORCH_ADAGRAD = [dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5),
                 dict(lr=0.05, maximize=True, weight_decay=0.01)] + list(_draws(5, 0))


def test_the_table_covers_every_option():
    for key in ("lr_decay", "weight_decay", "initial_accumulator_value", "maximize"):
        assert any(kw.get(key) for kw in TORCH_ADAGRAD), key


def _pull(kw):
    return -0.5 if kw.get("maximize") else 0.5


CASES = []
for i, kw in enumerate(TORCH_ADAGRAD):
    CASES += [
        (f"AdaGrad==torch.Adagrad{i}", lambda p, kw=kw: optimlab.AdaGrad(p, **kw),
         lambda p, kw=kw: torch.optim.Adagrad(p, **kw), _pull(kw), i % 2 == 0),
        (f"compat.torch.Adagrad{i}", lambda p, kw=kw: compat.torch.Adagrad(p, **kw),
         lambda p, kw=kw: torch.optim.Adagrad(p, **kw), _pull(kw), i % 2 == 1),
    ]
CASES += [("compat.torch.Adagrad defaults", lambda p: compat.torch.Adagrad(p),
           lambda p: torch.optim.Adagrad(p), 0.5, False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,ours,ref,pull,schedule", CASES, ids=[c[0] for c in CASES])
def test_parity(name, ours, ref, pull, schedule, dtype, impl):
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), ref, dtype=dtype, schedule=schedule,
                                  pull=pull)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, ADAGRAD_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[0]]["step"] == 500


@pytest.mark.parametrize("kw", [dict(lr=0.1, eps=1e-10),
                                dict(lr=0.3, eps=1e-3, lr_decay=0.05,
                                     initial_accumulator_value=0.2)])
def test_equals_the_paper_diagonal_algorithm(kw):
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.AdaGrad(p, **kw),
                                lambda p: DuchiDiagonalAdaGrad(p, **kw),
                                dtype=torch.float64, steps=200)
    assert max_param_diff(pa, pb) <= 1e-12


# ------------------------------------------------------------------ identities
def test_first_step_is_a_sign_step_of_size_lr():
    """s_1 = g_1^2, so with delta = 0 the first step is eta * g / |g| = eta * sign(g)."""
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, -2.0, 1e-4, -7.5, 1.0], dtype=torch.float64)
    opt = optimlab.AdaGrad([p], lr=0.1, eps=0.0)
    p.grad = g
    opt.step()
    assert torch.equal(p.detach(), -0.1 * g.sign())


def test_lr_decay_is_a_1_over_t_schedule():
    """Constant gradient c, s_0 = 0, delta = 0: step t moves by eta / (1 + (t-1) gamma) / sqrt(t)."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optimlab.AdaGrad([p], lr=0.5, lr_decay=0.2, eps=0.0)
    prev = 0.0
    for t in range(1, 11):
        p.grad = torch.full((1,), 0.7, dtype=torch.float64)
        opt.step()
        moved = prev - p.item()
        prev = p.item()
        assert moved == pytest.approx(0.5 / (1 + (t - 1) * 0.2) / math.sqrt(t), rel=1e-12)


def test_decoupled_decay_uses_the_group_lr_not_the_decayed_lr():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = optimlab.AdaGrad([p], lr=0.1, lr_decay=1.0, weight_decay=0.5, wd_mode="decoupled",
                           initial_accumulator_value=1.0)
    for _ in range(3):
        p.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), (1 - 0.1 * 0.5) ** 3,
                                                 dtype=torch.float64), rtol=0, atol=1e-15)


def test_state_is_initialised_from_the_groups_accumulator_value():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = optimlab.AdaGrad([{"params": [p]}, {"params": [q], "initial_accumulator_value": 2.0}],
                           initial_accumulator_value=0.5)
    p.grad, q.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    assert torch.equal(opt.state[p]["sum"], torch.full((2,), 0.5))
    assert torch.equal(opt.state[q]["sum"], torch.full((2,), 2.0))
    assert set(opt.state[p]) == {"step", "sum"}


def test_loads_a_torch_adagrad_state_dict():
    kw = dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)
    pa, ta, pb, tb = run_lockstep(lambda p: torch.optim.Adagrad(p, **kw),
                                  lambda p: torch.optim.Adagrad(p, **kw), steps=7,
                                  dtype=torch.float64)
    ours = optimlab.AdaGrad(pa, **kw, impl="reference")   # bit for bit with torch
    ours.load_state_dict(ta.state_dict())
    assert ours.state[pa[0]]["step"] == 7
    for _ in range(5):
        for p, q in zip(pa, pb):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.clone()
        ours.step()
        tb.step()
    assert max_param_diff(pa, pb) == 0.0


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(lr_decay=-0.1), "lr_decay"), (dict(eps=-1e-10), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(wd_mode="l1"), "wd_mode"),
    (dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (dict(nonfinite="zero"), "nonfinite"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimlab.AdaGrad([torch.zeros(2, requires_grad=True)], **kwargs)


def test_compat_rejects_unsupported_flags():
    with pytest.raises(ValueError, match="differentiable"):
        compat.torch.Adagrad([torch.zeros(2, requires_grad=True)], differentiable=True)

def test_compat_signature_is_torchs():
    """Same argument names, order, kinds and defaults as torch.optim.Adagrad (plus nonfinite)."""
    ours = inspect.signature(compat.torch.Adagrad).parameters
    theirs = inspect.signature(torch.optim.Adagrad.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items() if n != "nonfinite"] == \
        [(n, p.kind, p.default) for n, p in theirs.items() if n != "self"]
    assert ours["nonfinite"].kind is inspect.Parameter.KEYWORD_ONLY
