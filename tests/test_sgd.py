"""SGD (momentum, dampening, Nesterov, L2 / decoupled / independent decay) against the
implementations users migrate from.

Reference that runs for real: torch.optim.SGD.  References written here from the published
math, independent of optimlab: Composer's DecoupledSGDW and Loshchilov & Hutter's SGDW
(Algorithm 1).  Tolerances: max |dp| <= 1e-6 in float32 and <= 1e-12 in float64 over 500
steps, state compared to the same bound.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, clone_params, make_params, max_param_diff, max_state_diff,
                           run_lockstep, with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
SGD_KEYS = {"momentum_buffer": "momentum_buffer"}


# ------------------------------------------------------------------ literal references
class ComposerDecoupledSGDW(torch.optim.Optimizer):
    """composer.optim.DecoupledSGDW from its documented math: the momentum buffer of
    torch.optim.SGD (b_1 = g_1, b_t = mu b_{t-1} + (1 - dampening) g_t; d_t = b_t, or
    g_t + mu b_t with Nesterov), then theta *= 1 - (lr / initial_lr) * wd, then
    theta -= lr * d_t."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, initial_lr, mu = group["lr"], group["initial_lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d_p.clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(d_p, alpha=1 - group["dampening"])
                    buf = state["momentum_buffer"]
                    d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
                if group["weight_decay"] != 0:
                    decay_factor = (lr / initial_lr) if initial_lr else 1.0
                    p.mul_(1 - decay_factor * group["weight_decay"])
                p.add_(d_p, alpha=-lr)


class PaperSGDW(torch.optim.Optimizer):
    """Loshchilov & Hutter (2019), Algorithm 1 (SGD with momentum and decoupled weight
    decay), without the optional L2 term: with schedule multiplier eta_t = lr_t / alpha,

        m_t = beta1 m_{t-1} + eta_t alpha g_t            (m_0 = 0)
        theta_t = theta_{t-1} - m_t - eta_t lambda theta_{t-1}

    The lr sits inside the buffer here, outside it in torch/optimlab."""

    def __init__(self, params, lr, beta1, weight_decay):
        super().__init__(params, dict(lr=lr, alpha=lr, beta1=beta1, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            alpha, beta1, lam = group["alpha"], group["beta1"], group["weight_decay"]
            eta = group["lr"] / alpha
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                state["m"] = beta1 * state["m"] + eta * alpha * p.grad
                p.copy_(p - state["m"] - eta * lam * p)


# ------------------------------------------------------------------ the parity table
def _draws(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        momentum = rng.choice([0.0, 0.5, 0.9])
        nesterov = momentum > 0 and rng.random() < 0.5
        yield dict(lr=10 ** rng.uniform(-3, -1), momentum=momentum,
                   dampening=0.0 if nesterov else rng.choice([0.0, 0.1, 0.5]),
                   nesterov=nesterov, weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                   maximize=rng.random() < 0.25)


# fixed corners first so every option is exercised whatever the seed draws
TORCH_SGD = [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
             dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01),
             dict(lr=0.05, weight_decay=0.1, maximize=True),
             dict(lr=0.02, momentum=0.5, maximize=True, weight_decay=0.1)] + list(_draws(6, 0))


def test_the_table_covers_every_option():
    assert any(kw.get("nesterov") for kw in TORCH_SGD)
    assert any(kw.get("dampening", 0) > 0 and kw.get("momentum", 0) > 0 for kw in TORCH_SGD)
    assert any(kw.get("maximize") and kw.get("momentum", 0) > 0 for kw in TORCH_SGD)
    assert any(kw.get("momentum", 0) == 0 for kw in TORCH_SGD)
    assert any(kw.get("weight_decay", 0) > 0 for kw in TORCH_SGD)


def _pull(kw):
    # a maximizer climbs grad = noise + pull * p; pull < 0 keeps the ascent bounded
    return -0.5 if kw.get("maximize") else 0.5


CASES = []
for i, kw in enumerate(TORCH_SGD):
    CASES += [
        (f"SGD==torch.SGD{i}", lambda p, kw=kw: optimlab.SGD(p, **kw),
         lambda p, kw=kw: torch.optim.SGD(p, **kw), _pull(kw), i % 2 == 0),
        (f"compat.torch.SGD{i}", lambda p, kw=kw: compat.torch.SGD(p, **kw),
         lambda p, kw=kw: torch.optim.SGD(p, **kw), _pull(kw), i % 2 == 1),
    ]
CASES += [("compat.torch.SGD defaults", lambda p: compat.torch.SGD(p),
           lambda p: torch.optim.SGD(p), 0.5, False)]
for i, kw in enumerate([dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
                        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
                        dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=2e-2),
                        dict(lr=0.1, weight_decay=1e-2)]):
    CASES += [
        (f"compat.composer.DecoupledSGDW{i}",
         lambda p, kw=kw: compat.composer.DecoupledSGDW(p, **kw),
         lambda p, kw=kw: ComposerDecoupledSGDW(p, **kw), 0.5, True),
        (f"SGD(independent)==Composer{i}",
         lambda p, kw=kw: optimlab.SGD(p, **kw, wd_mode="independent"),
         lambda p, kw=kw: ComposerDecoupledSGDW(p, **kw), 0.5, True),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,ours,ref,pull,schedule", CASES, ids=[c[0] for c in CASES])
def test_parity(name, ours, ref, pull, schedule, dtype, impl):
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), ref, dtype=dtype, schedule=schedule,
                                  pull=pull)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, SGD_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[0]]["step"] == 500
    assert ("momentum_buffer" in oa.state[pa[0]]) == (oa.param_groups[0]["momentum"] != 0)


def test_composer_reference_decays_by_the_schedule_multiplier():
    """The Composer cases above run a cosine schedule: check that it is the ratio
    lr / initial_lr (not lr) that scales their decay, so initial_lr really is exercised."""
    p = torch.ones(3, requires_grad=True)
    opt = compat.composer.DecoupledSGDW([p], lr=0.1, weight_decay=0.01)
    opt.param_groups[0]["lr"] = 0.05            # multiplier 0.5
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 0.5 * 0.01), rtol=0, atol=1e-7)


# ------------------------------------------------------------------ identities
def test_decoupled_equals_l2_without_momentum():
    """With mu = 0: theta - eta (g + lambda theta) = (1 - eta lambda) theta - eta g; only
    the rounding differs."""
    for schedule in (False, True):
        pa, _, pb, _ = run_lockstep(
            lambda p: optimlab.SGD(p, lr=0.05, weight_decay=0.1, wd_mode="decoupled"),
            lambda p: optimlab.SGD(p, lr=0.05, weight_decay=0.1, wd_mode="l2"),
            dtype=torch.float64, schedule=schedule)
        assert max_param_diff(pa, pb) <= 1e-12


def test_decoupled_differs_from_l2_with_momentum():
    """With mu > 0 the L2 term is carried by the buffer; decoupled decay is not."""
    pa, _, pb, _ = run_lockstep(
        lambda p: optimlab.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, wd_mode="decoupled"),
        lambda p: optimlab.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, wd_mode="l2"),
        dtype=torch.float64, steps=50)
    assert max_param_diff(pa, pb) > 1e-3


def test_independent_decay_is_decoupled_decay_scaled_by_the_initial_lr():
    """(eta_t / eta_0) * (eta_0 * lambda) = eta_t * lambda: bit-identical at constant lr
    (eta_t / eta_0 is exactly 1), equal up to rounding under a schedule."""
    lr, lam = 0.05, 0.1
    kw = dict(lr=lr, momentum=0.9, nesterov=True)
    for schedule, bound in ((False, 0.0), (True, 1e-12)):
        pa, _, pb, _ = run_lockstep(
            lambda p: optimlab.SGD(p, **kw, weight_decay=lr * lam, wd_mode="independent"),
            lambda p: optimlab.SGD(p, **kw, weight_decay=lam, wd_mode="decoupled"),
            dtype=torch.float64, schedule=schedule)
        assert max_param_diff(pa, pb) <= bound


def test_sgdw_algorithm_1_at_constant_lr():
    """Algorithm 1's m_t = beta1 m + alpha g_t equals alpha * b_t when alpha is constant, so
    independent decay reproduces the paper; with a schedule the lr-in-buffer form differs
    (the departure named in the docstring)."""
    kw = dict(lr=0.05, weight_decay=1e-2)
    pa, _, pb, _ = run_lockstep(
        lambda p: optimlab.SGD(p, **kw, momentum=0.9, wd_mode="independent"),
        lambda p: PaperSGDW(p, **kw, beta1=0.9), dtype=torch.float64)
    assert max_param_diff(pa, pb) <= 1e-12
    pa, _, pb, _ = run_lockstep(
        lambda p: optimlab.SGD(p, **kw, momentum=0.9, wd_mode="independent"),
        lambda p: PaperSGDW(p, **kw, beta1=0.9), dtype=torch.float64, schedule=True)
    assert max_param_diff(pa, pb) > 1e-6


def test_wd_after_update_decays_the_updated_weights():
    """(1 - eta lambda)(theta - eta g) on a single step, by hand."""
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = optimlab.SGD([p], lr=0.1, weight_decay=0.5, wd_mode="decoupled", wd_after_update=True)
    p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    theta, g = torch.tensor([1.0, -2.0], dtype=torch.float64), p.grad
    expected = (theta - 0.1 * g) * (1 - 0.1 * 0.5)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-15)
    # torch's order, (1 - eta lambda) theta - eta g, is a different point
    assert not torch.allclose(p.detach(), (1 - 0.1 * 0.5) * theta - 0.1 * g, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ state dicts
def _step(opts_params, noise):
    for opt, params in opts_params:
        for p, n in zip(params, noise):
            p.grad = n + 0.5 * p.detach()
        opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("saved_after", [0, 3])
def test_state_dict_round_trip(momentum, saved_after):
    """Save after k steps (k = 0 included), load into a fresh optimizer on copies of the
    parameters, and the two continue identically."""
    kw = dict(lr=0.05, momentum=momentum, dampening=0.1 if momentum else 0.0, weight_decay=0.1)
    pa = make_params(dtype=torch.float64)
    oa = optimlab.SGD(pa, **kw)
    g = torch.Generator().manual_seed(3)
    noises = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
              for _ in range(saved_after + 5)]
    for n in noises[:saved_after]:
        _step([(oa, pa)], n)
    pb = clone_params(pa)
    ob = optimlab.SGD(pb, **kw)
    ob.load_state_dict(oa.state_dict())
    for n in noises[saved_after:]:
        _step([(oa, pa), (ob, pb)], n)
    assert max_param_diff(pa, pb) == 0.0
    expected = {"step", "momentum_buffer"} if momentum else {"step"}
    assert set(ob.state[pb[0]]) == expected


def test_unused_buffer_round_trips_and_is_set_from_the_first_gradient():
    """A state dict holding _init_state's form (step 0, a zero buffer) loads, and its first
    step sets the buffer to g_1 as torch does (with dampening, mu*0 + (1-tau) g_1 would not)."""
    kw = dict(lr=0.05, momentum=0.9, dampening=0.5)
    pa = make_params(dtype=torch.float64)
    oa = optimlab.SGD(pa, **kw)
    for p in pa:
        oa.state[p].update(oa._init_state(p, oa.param_groups[0]))
    pb, pt = clone_params(pa), clone_params(pa)
    ob, ot = optimlab.SGD(pb, **kw, impl="reference"), torch.optim.SGD(pt, **kw)
    ob.load_state_dict(oa.state_dict())
    assert ob.state[pb[0]]["step"] == 0
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        noise = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
        _step([(ob, pb), (ot, pt)], noise)
    assert max_param_diff(pb, pt) == 0.0


def test_loads_a_torch_sgd_state_dict():
    kw = dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)
    pt = make_params(dtype=torch.float64)
    ot = torch.optim.SGD(pt, **kw)
    g = torch.Generator().manual_seed(5)
    noises = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pt]
              for _ in range(10)]
    for n in noises[:4]:
        _step([(ot, pt)], n)
    po = clone_params(pt)
    oo = optimlab.SGD(po, **kw, impl="reference")   # bit for bit with torch
    oo.load_state_dict(ot.state_dict())
    for n in noises[4:]:
        _step([(ot, pt), (oo, po)], n)
    assert max_param_diff(po, pt) == 0.0
    assert max_state_diff(oo, po, ot, pt, SGD_KEYS) == 0.0


def test_mismatched_state_dict_is_rejected():
    pa = make_params()
    oa = optimlab.SGD(pa, lr=0.1, momentum=0.9)
    _step([(oa, pa)], [torch.randn(p.shape) for p in pa])
    ob = optimlab.SGD(clone_params(pa), lr=0.1)              # no momentum: no buffer
    with pytest.raises(ValueError, match="state keys"):
        ob.load_state_dict(oa.state_dict())


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(momentum=-0.1), "momentum"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=0.9, dampening=-0.1), "dampening"),
    (dict(momentum=0.9, dampening=1.5), "dampening"),
    (dict(nesterov=True), "nesterov"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(wd_mode="l1"), "wd_mode"),
    (dict(nonfinite="zero"), "nonfinite"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimlab.SGD([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_override_is_rejected():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="momentum"):
        optimlab.SGD([{"params": [p]}, {"params": [q], "momentum": -1.0}])


def test_compat_rejects_unsupported_flags_and_nesterov_without_momentum():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="differentiable"):
        compat.torch.SGD(p, differentiable=True)
    with pytest.raises(ValueError, match="nesterov"):
        compat.composer.DecoupledSGDW(p, lr=0.1, nesterov=True)

def test_compat_signature_is_torchs():
    """Same argument names, order, kinds and defaults as torch.optim.SGD (plus nonfinite)."""
    ours = inspect.signature(compat.torch.SGD).parameters
    theirs = inspect.signature(torch.optim.SGD.__init__).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items() if n != "nonfinite"] == \
        [(n, p.kind, p.default) for n, p in theirs.items() if n != "self"]
    assert ours["nonfinite"].kind is inspect.Parameter.KEYWORD_ONLY


def test_composer_signature():
    """composer.optim.DecoupledSGDW(params, lr=required, momentum=0, dampening=0,
    weight_decay=0, nesterov=False)."""
    params = inspect.signature(compat.composer.DecoupledSGDW).parameters
    assert list(params)[:6] == ["params", "lr", "momentum", "dampening", "weight_decay",
                                "nesterov"]
    assert params["lr"].default is inspect.Parameter.empty
    assert [params[n].default for n in ("momentum", "dampening", "weight_decay", "nesterov")] \
        == [0, 0, 0, False]
