"""RAdam against torch.optim.RAdam running for real, and against the paper's Algorithm 2
written here from its formulas (both eps placements, both thresholds, with and without the
SGD fallback).  Tolerances: max |dp| <= 1e-6 in float32 and <= 1e-12 in float64 over 500
steps, state compared to the same bound.
"""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, make_params, max_param_diff, max_state_diff, run_lockstep,
                           with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
RADAM_KEYS = {"step": "step", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


# ------------------------------------------------------------------ literal reference
class PaperRAdam(torch.optim.Optimizer):
    """Liu et al. (2020), Algorithm 2, line by line, with eps added to l_t where
    ``eps_placement`` says (the paper has none):

        m_t = beta1 m_{t-1} + (1 - beta1) g_t ;  v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m^_t = m_t / (1 - beta1^t)
        rho_inf = 2 / (1 - beta2) - 1 ;  rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
        if rho_t > threshold:
            l_t = sqrt((1 - beta2^t) / v_t)
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            theta_t = theta_{t-1} - alpha_t r_t m^_t l_t
        else:
            theta_t = theta_{t-1} - alpha_t m^_t      (only with degenerate_to_sgd)
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, eps_placement="sqrt_v",
                 rho_threshold=4.0, degenerate_to_sgd=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, eps_placement=eps_placement,
                                      rho_threshold=rho_threshold,
                                      degenerate_to_sgd=degenerate_to_sgd))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            alpha, eps = group["lr"], group["eps"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, g = state["t"], p.grad
                state["m"] = beta1 * state["m"] + (1 - beta1) * g
                state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
                m_hat = state["m"] / (1 - beta1 ** t)
                rho_inf = 2 / (1 - beta2) - 1
                rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
                if rho_t > group["rho_threshold"]:
                    if group["eps_placement"] == "sqrt_v":
                        l_t = math.sqrt(1 - beta2 ** t) / (torch.sqrt(state["v"]) + eps)
                    else:
                        l_t = 1 / (torch.sqrt(state["v"] / (1 - beta2 ** t)) + eps)
                    r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                    p.sub_(alpha * r_t * m_hat * l_t)
                elif group["degenerate_to_sgd"]:
                    p.sub_(alpha * m_hat)


# ------------------------------------------------------------------ the parity table
def _draws(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        yield dict(lr=10 ** rng.uniform(-3.5, -1.5),
                   betas=(rng.choice([0.0, 0.8, 0.9]), rng.choice([0.5, 0.9, 0.99, 0.999])),
                   eps=rng.choice([1e-8, 1e-6, 1e-3]), weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                   decoupled_weight_decay=rng.random() < 0.5, maximize=rng.random() < 0.25)


TORCH_RADAM = [dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
               dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False, betas=(0.9, 0.99)),
               dict(lr=1e-2, maximize=True, weight_decay=0.01, betas=(0.8, 0.9))] + \
    list(_draws(5, 0))


def test_the_table_covers_every_option():
    for key in ("weight_decay", "decoupled_weight_decay", "maximize"):
        assert any(kw.get(key) for kw in TORCH_RADAM), key
    assert any(kw.get("weight_decay") and not kw.get("decoupled_weight_decay")
               for kw in TORCH_RADAM)


def _native(kw):
    kw = dict(kw)
    kw["wd_mode"] = "decoupled" if kw.pop("decoupled_weight_decay", False) else "l2"
    return kw


def _pull(kw):
    return -0.5 if kw.get("maximize") else 0.5


CASES = []
for i, kw in enumerate(TORCH_RADAM):
    CASES += [
        (f"RAdam==torch.RAdam{i}", lambda p, kw=kw: optimlab.RAdam(p, **_native(kw)),
         lambda p, kw=kw: torch.optim.RAdam(p, **kw), _pull(kw), i % 2 == 0),
        (f"compat.torch.RAdam{i}", lambda p, kw=kw: compat.torch.RAdam(p, **kw),
         lambda p, kw=kw: torch.optim.RAdam(p, **kw), _pull(kw), i % 2 == 1),
    ]
CASES += [("compat.torch.RAdam defaults", lambda p: compat.torch.RAdam(p),
           lambda p: torch.optim.RAdam(p), 0.5, False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,ours,ref,pull,schedule", CASES, ids=[c[0] for c in CASES])
def test_parity(name, ours, ref, pull, schedule, dtype, impl):
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), ref, dtype=dtype, schedule=schedule,
                                  pull=pull)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, RADAM_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[0]]["step"] == 500


@pytest.mark.parametrize("eps_placement", ["sqrt_v", "sqrt_v_hat"])
@pytest.mark.parametrize("rho_threshold,degenerate_to_sgd", [(4.0, True), (5.0, True),
                                                             (5.0, False)])
def test_equals_algorithm_2(eps_placement, rho_threshold, degenerate_to_sgd):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, eps_placement=eps_placement,
              rho_threshold=rho_threshold, degenerate_to_sgd=degenerate_to_sgd)
    pa, oa, pb, ob = run_lockstep(lambda p: optimlab.RAdam(p, **kw),
                                  lambda p: PaperRAdam(p, **kw),
                                  dtype=torch.float64, schedule=True)
    assert max_param_diff(pa, pb) <= 1e-12
    assert max_state_diff(oa, pa, ob, pb, {"exp_avg": "m", "exp_avg_sq": "v"}) <= 1e-12


# ------------------------------------------------------------------ the un-adapted steps
def _run(steps, **kw):
    pa, oa, _, _ = run_lockstep(lambda p: optimlab.RAdam(p, **kw),
                                lambda p: torch.optim.SGD(p, lr=0.0), steps=steps,
                                dtype=torch.float64, pull=0.0)
    return pa, oa


def test_no_update_while_rho_is_at_most_the_threshold():
    """beta2 = 0.999: rho_1..rho_5 = 1, 2, 3, 4, 4.996 <= 5 < rho_6 = 5.994.  Without the
    SGD fallback the parameters stay put for five steps while the moments still move."""
    init = make_params(dtype=torch.float64)
    pa, oa = _run(5, lr=1e-2, degenerate_to_sgd=False)
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(pa, init))
    assert all(oa.state[p]["exp_avg"].abs().min() > 0 for p in pa)
    pb, ob = _run(5, lr=1e-2, degenerate_to_sgd=True)       # same gradients (pull = 0)
    assert max_state_diff(oa, pa, ob, pb, RADAM_KEYS) == 0.0
    assert max_param_diff(pb, init) > 1e-3
    pa, _ = _run(6, lr=1e-2, degenerate_to_sgd=False)
    assert all((p.detach() - q.detach()).abs().min() > 0 for p, q in zip(pa, init))


def test_threshold_4_and_5_differ_only_from_step_5():
    """rho_5 = 4.996 lies between the paper's threshold (4) and torch's (5): step 5 is
    rectified with rho_threshold=4 and an SGD step with rho_threshold=5; steps 1-4 are SGD
    steps for both."""
    a, _ = _run(4, lr=1e-2, rho_threshold=4.0)
    b, _ = _run(4, lr=1e-2, rho_threshold=5.0)
    assert max_param_diff(a, b) == 0.0
    a, _ = _run(5, lr=1e-2, rho_threshold=4.0)
    b, _ = _run(5, lr=1e-2, rho_threshold=5.0)
    assert max_param_diff(a, b) > 1e-4


def test_small_beta2_never_rectifies():
    """beta2 = 0.5: rho_inf = 3 < 4, so every step is theta -= lr * m^_t, i.e. the result
    does not depend on eps or on where it is placed."""
    a, _ = _run(50, lr=1e-2, betas=(0.9, 0.5), eps=1e-8, rho_threshold=4.0)
    b, _ = _run(50, lr=1e-2, betas=(0.9, 0.5), eps=1.0, eps_placement="sqrt_v_hat",
                rho_threshold=4.0)
    assert max_param_diff(a, b) == 0.0


# ------------------------------------------------------------------ eps placement
def test_eps_placements_differ_early_and_agree_when_eps_is_zero():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), rho_threshold=4.0)
    a, _ = _run(20, **kw, eps=1e-3, eps_placement="sqrt_v")
    b, _ = _run(20, **kw, eps=1e-3, eps_placement="sqrt_v_hat")
    assert max_param_diff(a, b) > 1e-5
    a, _ = _run(200, **kw, eps=0.0, eps_placement="sqrt_v")
    b, _ = _run(200, **kw, eps=0.0, eps_placement="sqrt_v_hat")
    assert max_param_diff(a, b) <= 1e-12


def test_torch_decoupled_decay_happens_on_the_sgd_steps_too():
    """torch.optim.RAdam(decoupled_weight_decay=True) shrinks theta on every step, including
    the un-rectified ones: with zero gradients theta_t = (1 - lr wd)^t theta_0."""
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = compat.torch.RAdam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    for _ in range(3):
        p.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.95 ** 3, dtype=torch.float64),
                          rtol=0, atol=1e-15)


def test_loads_a_torch_radam_state_dict():
    kw = dict(lr=1e-2, weight_decay=0.01)
    pa, ta, pb, tb = run_lockstep(lambda p: torch.optim.RAdam(p, **kw),
                                  lambda p: torch.optim.RAdam(p, **kw), steps=4,
                                  dtype=torch.float64)
    ours = optimlab.RAdam(pa, **kw, impl="reference")   # bit for bit with torch
    ours.load_state_dict(ta.state_dict())
    g = torch.Generator().manual_seed(11)
    for _ in range(6):                       # crosses rho_t > 5 at step 6
        noise = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
        for params in (pa, pb):
            for p, n in zip(params, noise):
                p.grad = n.clone()
        ours.step()
        tb.step()
    assert max_param_diff(pa, pb) == 0.0
    assert ours.state[pa[0]]["step"] == 10


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=0.9), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(wd_mode="l1"), "wd_mode"),
    (dict(rho_threshold=3.9), "rho_threshold"), (dict(rho_threshold=float("nan")), "rho_threshold"),
    (dict(eps_placement="inside"), "eps_placement"), (dict(nonfinite="zero"), "nonfinite"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimlab.RAdam([torch.zeros(2, requires_grad=True)], **kwargs)


def test_compat_rejects_unsupported_flags():
    with pytest.raises(ValueError, match="capturable"):
        compat.torch.RAdam([torch.zeros(2, requires_grad=True)], capturable=True)

def test_compat_signature_is_torchs():
    """Same argument names, order, kinds and defaults as torch.optim.RAdam (plus nonfinite)."""
    ours = inspect.signature(compat.torch.RAdam).parameters
    theirs = inspect.signature(torch.optim.RAdam.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items() if n != "nonfinite"] == \
        [(n, p.kind, p.default) for n, p in theirs.items() if n != "self"]
    assert ours["nonfinite"].kind is inspect.Parameter.KEYWORD_ONLY
