"""RMSProp (plain, centered, with momentum) against torch.optim.RMSprop running for real, and
against lecture 6.5's rule written here from the slide.  Tolerances: max |dp| <= 1e-6 in
float32 and <= 1e-12 in float64 over 500 steps, state compared to the same bound.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, clone_params, max_param_diff, max_state_diff, run_lockstep,
                           with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
RMSPROP_KEYS = {"step": "step", "square_avg": "square_avg",
                "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"}


# ------------------------------------------------------------------ literal reference
class Lecture65RMSProp(torch.optim.Optimizer):
    """Tieleman & Hinton, lecture 6.5: MeanSquare(w, t) = alpha MeanSquare(w, t-1) +
    (1 - alpha) (dE/dw)^2, and the weight moves by -lr * (dE/dw) / sqrt(MeanSquare(w, t))
    (no eps, no momentum)."""

    def __init__(self, params, lr, alpha):
        super().__init__(params, dict(lr=lr, alpha=alpha))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["mean_square"] = torch.zeros_like(p)
                ms = group["alpha"] * state["mean_square"] + (1 - group["alpha"]) * p.grad ** 2
                state["mean_square"] = ms
                p.sub_(group["lr"] * p.grad / torch.sqrt(ms))


# ------------------------------------------------------------------ the parity table
def _draws(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        yield dict(lr=10 ** rng.uniform(-4, -2), alpha=rng.choice([0.5, 0.9, 0.99]),
                   eps=rng.choice([1e-8, 1e-6, 1e-3]), weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                   momentum=rng.choice([0.0, 0.5, 0.9]), centered=rng.random() < 0.5,
                   maximize=rng.random() < 0.25)


TORCH_RMSPROP = [dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.1),
                 dict(lr=1e-3, momentum=0.0, centered=True, alpha=0.9),
                 dict(lr=1e-3, momentum=0.5, centered=False, maximize=True, weight_decay=0.01),
                 ] + list(_draws(5, 0))


def test_the_table_covers_every_option():
    for key in ("momentum", "centered", "weight_decay", "maximize"):
        assert any(kw.get(key) for kw in TORCH_RMSPROP), key
    assert any(kw.get("momentum") and kw.get("centered") for kw in TORCH_RMSPROP)


def _pull(kw):
    return -0.5 if kw.get("maximize") else 0.5


CASES = []
for i, kw in enumerate(TORCH_RMSPROP):
    CASES += [
        (f"RMSProp==torch.RMSprop{i}", lambda p, kw=kw: optimlab.RMSProp(p, **kw),
         lambda p, kw=kw: torch.optim.RMSprop(p, **kw), _pull(kw), i % 2 == 0),
        (f"compat.torch.RMSprop{i}", lambda p, kw=kw: compat.torch.RMSprop(p, **kw),
         lambda p, kw=kw: torch.optim.RMSprop(p, **kw), _pull(kw), i % 2 == 1),
    ]
CASES += [("compat.torch.RMSprop defaults", lambda p: compat.torch.RMSprop(p),
           lambda p: torch.optim.RMSprop(p), 0.5, False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,ours,ref,pull,schedule", CASES, ids=[c[0] for c in CASES])
def test_parity(name, ours, ref, pull, schedule, dtype, impl):
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), ref, dtype=dtype, schedule=schedule,
                                  pull=pull)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, RMSPROP_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[0]]["step"] == 500
    group = oa.param_groups[0]
    assert set(oa.state[pa[0]]) == ({"step", "square_avg"}
                                     | ({"momentum_buffer"} if group["momentum"] else set())
                                     | ({"grad_avg"} if group["centered"] else set()))


@pytest.mark.parametrize("alpha", [0.9, 0.99])
def test_equals_lecture_6_5(alpha):
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.RMSProp(p, lr=1e-3, alpha=alpha, eps=0.0),
                                lambda p: Lecture65RMSProp(p, lr=1e-3, alpha=alpha),
                                dtype=torch.float64, schedule=True)
    assert max_param_diff(pa, pb) <= 1e-12


# ------------------------------------------------------------------ identities
def test_alpha_zero_without_eps_is_sign_descent():
    """v_t = g_t^2, so g_t / sqrt(v_t) = sign(g_t): every step moves each coordinate by
    exactly lr (sqrt of a correctly rounded square is exact)."""
    pa, oa, pb, _ = run_lockstep(lambda p: optimlab.RMSProp(p, lr=1e-2, alpha=0.0, eps=0.0),
                                 lambda p: torch.optim.SGD(p, lr=0.0), steps=1,
                                 dtype=torch.float64)
    init = [p.detach() for p in pb]         # lr = 0: the initial parameters
    grads = [p.grad for p in pa]
    for p, p0, g in zip(pa, init, grads):
        assert torch.equal(p.detach(), p0 - 1e-2 * g.sign())


def test_centered_with_a_constant_gradient_divides_by_eps():
    """With g_t = c for all t: a_t = (1 - alpha^t) c and v_t = (1 - alpha^t) c^2, so
    v_t - a_t^2 = alpha^t (1 - alpha^t) c^2: the centered denominator shrinks towards eps
    while the plain one tends to |c|."""
    c, alpha, lr, eps = 0.5, 0.5, 1e-3, 1e-2
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optimlab.RMSProp([p], lr=lr, alpha=alpha, eps=eps, centered=True)
    prev = 0.0
    for t in range(1, 8):
        p.grad = torch.full((1,), c, dtype=torch.float64)
        opt.step()
        moved, prev = prev - p.item(), p.item()
        std = (alpha ** t * (1 - alpha ** t)) ** 0.5 * c
        assert moved == pytest.approx(lr * c / (std + eps), rel=1e-10)


@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.9, True)])
def test_state_dict_round_trip_and_torch_format(momentum, centered):
    kw = dict(lr=1e-3, momentum=momentum, centered=centered)
    pa, ta, pb, tb = run_lockstep(lambda p: torch.optim.RMSprop(p, **kw),
                                  lambda p: torch.optim.RMSprop(p, **kw), steps=7,
                                  dtype=torch.float64)
    ours = optimlab.RMSProp(pa, **kw, impl="reference")   # bit for bit with torch
    ours.load_state_dict(ta.state_dict())               # torch's format: tensor step
    pc = clone_params(pa)
    again = optimlab.RMSProp(pc, **kw, impl="reference")
    again.load_state_dict(ours.state_dict())            # our own format
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        noise = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
        for params in (pa, pb, pc):
            for p, n in zip(params, noise):
                p.grad = n.clone()
        ours.step()
        tb.step()
        again.step()
    assert max_param_diff(pa, pb) == 0.0
    assert max_param_diff(pa, pc) == 0.0
    assert ours.state[pa[0]]["step"] == 12


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(alpha=-0.1), "alpha"), (dict(alpha=1.0), "alpha"),
    (dict(eps=-1e-8), "eps"),
    (dict(momentum=-0.1), "momentum"), (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(wd_mode="l1"), "wd_mode"),
    (dict(nonfinite="zero"), "nonfinite"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimlab.RMSProp([torch.zeros(2, requires_grad=True)], **kwargs)


def test_compat_rejects_unsupported_flags():
    with pytest.raises(ValueError, match="capturable"):
        compat.torch.RMSprop([torch.zeros(2, requires_grad=True)], capturable=True)

def test_compat_signature_is_torchs():
    """Same argument names, order, kinds and defaults as torch.optim.RMSprop (plus nonfinite)."""
    ours = inspect.signature(compat.torch.RMSprop).parameters
    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items() if n != "nonfinite"] == \
        [(n, p.kind, p.default) for n, p in theirs.items() if n != "self"]
    assert ours["nonfinite"].kind is inspect.Parameter.KEYWORD_ONLY
