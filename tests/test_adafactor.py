"""Adafactor against the implementations users migrate from, and against the paper.

References that run for real: torch.optim.Adafactor (its for-loop kernel, and the foreach
one) and transformers' Adafactor (skipped when transformers is not installed).  Reference
written here from the paper: Algorithms 4 and 5 of Shazeer & Stern (2018) with row and
column *sums*.  Tolerances: max |dp| <= 1e-6 in float32 and <= 1e-12 in float64 over 500
steps on 1-D, 2-D and 3-D parameters; state compared to the same bound.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import optimlab
from optimlab import compat
from tests.helpers import (IMPLS, SHAPES, clone_params, make_params, max_param_diff,
                           max_state_diff, run_lockstep, with_impl)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6}
TORCH_KEYS = {"step": "step", "exp_avg_sq_row": "row_var", "exp_avg_sq_col": "col_var",
              "exp_avg_sq": "variance"}
HF_KEYS = {"step": "step", "exp_avg": "exp_avg", "exp_avg_sq_row": "exp_avg_sq_row",
           "exp_avg_sq_col": "exp_avg_sq_col", "exp_avg_sq": "exp_avg_sq"}

assert any(len(s) == 3 for s in SHAPES)            # factoring over the last two dims


def _hf():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    return transformers_optimization.Adafactor


# ------------------------------------------------------------------ native configurations
def native_like_torch(p, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                      weight_decay=0.0, maximize=False, foreach=None):
    """torch.optim.Adafactor written as optimlab options (no compat module involved)."""
    return optimlab.Adafactor(p, lr=lr, eps=eps, clip_threshold=d, decay_rate=beta2_decay,
                              beta1=None, weight_decay=weight_decay, wd_mode="decoupled",
                              scale_parameter=True, relative_step=True, warmup_init=False,
                              eps1_placement="clamp", decay_scale="lr", upcast=False,
                              maximize=maximize, nonfinite="ignore")


def native_like_hf(p, lr=None, relative_step=True, **kw):
    """transformers' Adafactor written as optimlab options."""
    return optimlab.Adafactor(p, lr=1e-2 if relative_step else lr, relative_step=relative_step,
                              eps1_placement="grad_sq", momentum_of="scaled_update",
                              decay_scale="alpha", wd_mode="decoupled", upcast=True,
                              nonfinite="ignore", **kw)


# ------------------------------------------------------------------ parity: torch.optim
# (constructor kwargs, run_lockstep kwargs)
TORCH_DRAWS = [
    (dict(), dict()),
    (dict(lr=1e-3), dict(schedule=True)),
    (dict(lr=0.1, weight_decay=0.1), dict(schedule=True)),     # rho_t = 1/sqrt(t) early
    (dict(eps=(1e-8, 1e-3), weight_decay=0.02), dict()),
    (dict(d=2.0, beta2_decay=-0.5), dict(schedule=True)),
    # maximize ascends: a negative pull keeps the quadratic stable (as the other files'
    # _pull does), so the fast paths' rounding is not amplified by a diverging run
    (dict(maximize=True, weight_decay=0.05), dict(pull=-0.5)),
    (dict(beta2_decay=-1.0, eps=(None, 0.5)), dict()),
    # tiny gradients: the eps1 clamps of mean(R) and of V^ bind
    (dict(eps=(1e-2, 1e-3), d=1.5), dict(scale=1e-3, pull=0.0)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw,run", TORCH_DRAWS, ids=[f"draw{i}" for i in range(len(TORCH_DRAWS))])
def test_parity_torch(kw, run, dtype, impl):
    # float32 through the compat constructor, float64 through the native options
    ours = ((lambda p: compat.torch.Adafactor(p, **kw, nonfinite="ignore"))
            if dtype == torch.float32 else (lambda p: native_like_torch(p, **kw)))
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl),
                                  lambda p: torch.optim.Adafactor(p, **kw),
                                  dtype=dtype, **run)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, TORCH_KEYS, reshape=True,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[1]]["step"] == 500
    assert "exp_avg" not in oa.state[pa[1]]


def test_parity_torch_foreach_kernel():
    kw = dict(lr=3e-2, weight_decay=0.1)
    pa, oa, pb, ob = run_lockstep(lambda p: compat.torch.Adafactor(p, **kw, foreach=True),
                                  lambda p: torch.optim.Adafactor(p, **kw, foreach=True),
                                  schedule=True)
    assert max_param_diff(pa, pb) <= TOL[torch.float32]
    assert max_state_diff(oa, pa, ob, pb, TORCH_KEYS, reshape=True) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_parity_torch_low_precision_computes_in_param_dtype(dtype):
    pa, oa, pb, ob = run_lockstep(lambda p: compat.torch.Adafactor(p, weight_decay=0.1,
                                                                   foreach=False),
                                  lambda p: torch.optim.Adafactor(p, weight_decay=0.1),
                                  dtype=dtype, steps=100)
    assert max_param_diff(pa, pb) <= 1e-6
    assert oa.state[pa[1]]["exp_avg_sq_row"].dtype == dtype


def test_torch_eps1_none_is_the_first_parameters_machine_epsilon_group_wide():
    # torch.optim resolves eps1=None once per group, from the first parameter's dtype
    g = torch.Generator().manual_seed(3)
    pa = [torch.randn(6, dtype=torch.float64, generator=g) * 1e-9,
          (torch.randn(4, 3, generator=g) * 1e-9).float()]
    pb = clone_params(pa)
    pa = [p.requires_grad_() for p in pa]
    oa = compat.torch.Adafactor(pa, weight_decay=0.1, foreach=False)
    ob = torch.optim.Adafactor(pb, weight_decay=0.1)
    for _ in range(50):
        for p, q in zip(pa, pb):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-9
            p.grad, q.grad = noise.clone(), noise.clone()
        oa.step()
        ob.step()
    assert max_param_diff(pa, pb) == 0.0


# ------------------------------------------------------------------ parity: transformers
HF_DRAWS = [
    (dict(), dict()),
    (dict(beta1=0.9), dict()),
    (dict(beta1=0.9, weight_decay=0.1), dict()),
    (dict(scale_parameter=False, weight_decay=0.05), dict()),
    (dict(warmup_init=True, weight_decay=0.05, beta1=0.5), dict()),
    (dict(relative_step=False, lr=1e-3), dict(schedule=True)),
    (dict(relative_step=False, scale_parameter=False, lr=3e-3, beta1=0.9, weight_decay=0.1),
     dict(schedule=True)),
    (dict(clip_threshold=0.5, decay_rate=-0.5), dict()),
    (dict(clip_threshold=2.0, eps=(1e-20, 1e-2), decay_rate=-1.0, beta1=0.0), dict()),
    (dict(eps=(1e-30, 10.0), weight_decay=0.1), dict()),            # the eps2 floor binds
    (dict(eps=(1e-6, 1e-3), beta1=0.9), dict(scale=1e-3, pull=0.0)),  # eps1 ~ g^2
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw,run", HF_DRAWS, ids=[f"draw{i}" for i in range(len(HF_DRAWS))])
def test_parity_transformers(kw, run, dtype, impl):
    HFAdafactor = _hf()
    ours = ((lambda p: compat.hf.Adafactor(p, **kw, nonfinite="ignore"))
            if dtype == torch.float32 else (lambda p: native_like_hf(p, **kw)))
    pa, oa, pb, ob = run_lockstep(with_impl(ours, impl), lambda p: HFAdafactor(p, **kw),
                                  dtype=dtype, **run)
    assert max_param_diff(pa, pb, scaled=impl != "reference") <= TOL[dtype]
    assert max_state_diff(oa, pa, ob, pb, HF_KEYS,
                          scaled=impl != "reference") <= TOL[dtype]
    assert oa.state[pa[1]]["step"] == 500
    assert ("exp_avg" in oa.state[pa[1]]) == (kw.get("beta1") is not None)


def test_parity_transformers_low_precision_upcasts():
    HFAdafactor = _hf()
    kw = dict(beta1=0.9, weight_decay=0.1)
    pa, oa, pb, ob = run_lockstep(lambda p: compat.hf.Adafactor(p, **kw),
                                  lambda p: HFAdafactor(p, **kw), dtype=torch.bfloat16,
                                  steps=100)
    assert max_param_diff(pa, pb) <= TOL[torch.bfloat16]
    assert max_state_diff(oa, pa, ob, pb, HF_KEYS) <= TOL[torch.bfloat16]
    assert oa.state[pa[1]]["exp_avg"].dtype == torch.float32
    assert pa[1].dtype == torch.bfloat16


def test_compat_constructors_build_the_native_configurations():
    def config(opt):
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    p = [torch.zeros(3, 2, requires_grad=True)]
    for kw in [dict(), dict(lr=1e-3, d=2.0, weight_decay=0.1, maximize=True)]:
        a, b = compat.torch.Adafactor(p, **kw, nonfinite="ignore"), native_like_torch(p, **kw)
        assert config(a) == config(b)
    for kw in [dict(), dict(beta1=0.9, warmup_init=True),
               dict(relative_step=False, lr=1e-3, scale_parameter=False)]:
        a, b = compat.hf.Adafactor(p, **kw, nonfinite="ignore"), native_like_hf(p, **kw)
        assert config(a) == config(b)


# ------------------------------------------------------------------ the paper, literally
class PaperAdafactor(torch.optim.Optimizer):
    """Algorithms 4 (matrices; leading dims as batch) and 5 (vectors) of Shazeer & Stern,
    with the row and column sums R_t, C_t and V^_t = R_t C_t / (1_n^T R_t)."""

    def __init__(self, params, eps1=1e-30, eps2=1e-3, d=1.0, c=-0.8, warmup=False):
        # no lr in the paper; the key is there for the harness, which reads it
        super().__init__(params, dict(lr=None, eps1=eps1, eps2=eps2, d=d, c=c,
                                      warmup=warmup))

    @staticmethod
    def rms(x):
        return torch.sqrt((x * x).mean())

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            eps1, eps2, d, c = group["eps1"], group["eps2"], group["d"], group["c"]
            for X in group["params"]:
                G = X.grad
                s = self.state[X]
                if not s:
                    s["t"] = 0
                    if X.dim() >= 2:
                        s["R"] = torch.zeros(X.shape[:-1], dtype=X.dtype)
                        s["C"] = torch.zeros(X.shape[:-2] + X.shape[-1:], dtype=X.dtype)
                    else:
                        s["V"] = torch.zeros_like(X)
                s["t"] += 1
                t = s["t"]
                rho = min(1e-6 * t if group["warmup"] else 1e-2, 1 / math.sqrt(t))
                alpha = max(eps2, self.rms(X).item()) * rho
                beta2 = 1 - t ** c
                G2 = G * G + eps1
                if X.dim() >= 2:
                    s["R"] = beta2 * s["R"] + (1 - beta2) * G2.sum(dim=-1)
                    s["C"] = beta2 * s["C"] + (1 - beta2) * G2.sum(dim=-2)
                    V = (s["R"].unsqueeze(-1) * s["C"].unsqueeze(-2)
                         / s["R"].sum(dim=-1)[..., None, None])
                else:
                    s["V"] = beta2 * s["V"] + (1 - beta2) * G2
                    V = s["V"]
                U = G / torch.sqrt(V)
                U_hat = U / max(1.0, self.rms(U).item() / d)
                X.sub_(alpha * U_hat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("warmup", [False, True], ids=["rho", "warmup"])
def test_matches_the_papers_algorithm(dtype, warmup):
    pa, oa, pb, ob = run_lockstep(lambda p: optimlab.Adafactor(p, warmup_init=warmup),
                                  lambda p: PaperAdafactor(p, warmup=warmup), dtype=dtype)
    assert max_param_diff(pa, pb) <= TOL[dtype]
    for a, b in zip(pa, pb):                       # means here, sums in the paper
        sa, sb = oa.state[a], ob.state[b]
        if a.dim() >= 2:
            torch.testing.assert_close(sa["exp_avg_sq_row"] * a.shape[-1], sb["R"],
                                       rtol=1e-5, atol=0)
            torch.testing.assert_close(sa["exp_avg_sq_col"] * a.shape[-2], sb["C"],
                                       rtol=1e-5, atol=0)
        else:
            torch.testing.assert_close(sa["exp_avg_sq"], sb["V"], rtol=1e-5, atol=0)


def test_default_relative_step_is_the_papers_and_transformers():
    # min(1e-6 t, 1/sqrt t) never exceeds 1e-2, so the lr=1e-2 cap changes nothing
    from optimlab.adafactor import relative_step_size
    for t in list(range(1, 2000)) + [9999, 10_000, 10_001, 10 ** 6]:
        assert relative_step_size(t, 1e-2, True, False) == min(1e-2, 1.0 / math.sqrt(t))
        assert relative_step_size(t, 1e-2, True, True) == min(1e-6 * t, 1.0 / math.sqrt(t))
    assert relative_step_size(7, 3e-4, False, False) == 3e-4


# ------------------------------------------------------------------ identities of options
def test_momentum_of_update_equals_scaled_update_at_constant_step():
    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    for placement in ("grad_sq", "clamp"):
        pa, _, pb, _ = run_lockstep(
            lambda p: optimlab.Adafactor(p, **kw, eps1_placement=placement),
            lambda p: optimlab.Adafactor(p, **kw, eps1_placement=placement,
                                         momentum_of="update"),
            dtype=torch.float64, steps=200)
        assert max_param_diff(pa, pb) <= 1e-12


def test_eps1_placements_agree_when_eps1_is_zero():
    pa, _, pb, _ = run_lockstep(lambda p: optimlab.Adafactor(p, eps=(0.0, 1e-3)),
                                lambda p: optimlab.Adafactor(p, eps=(0.0, 1e-3),
                                                             eps1_placement="clamp"),
                                dtype=torch.float64, steps=200)
    assert max_param_diff(pa, pb) <= 1e-12


def test_weight_decay_modes():
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9)
    # independent decay at a constant lr is decoupled decay with lambda * lr
    pa, _, pb, _ = run_lockstep(
        lambda p: optimlab.Adafactor(p, **kw, weight_decay=0.1 * 1e-2, wd_mode="independent"),
        lambda p: optimlab.Adafactor(p, **kw, weight_decay=0.1), dtype=torch.float64,
        steps=100)
    assert max_param_diff(pa, pb) <= 1e-12

    def one_step(**options):
        p = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64, requires_grad=True)
        opt = optimlab.Adafactor([p], **kw, **options)
        p.grad = torch.tensor([[0.3, -0.1], [0.2, 0.4]], dtype=torch.float64)
        opt.step()
        return p.detach()
    theta0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    plain = one_step()
    step = theta0 - plain                           # alpha_t * m_1, independent of theta
    torch.testing.assert_close(one_step(weight_decay=0.1),
                               theta0 * (1 - 1e-2 * 0.1) - step, rtol=1e-14, atol=0)
    torch.testing.assert_close(one_step(weight_decay=0.1, wd_after_update=True),
                               (theta0 - step) * (1 - 1e-2 * 0.1), rtol=1e-14, atol=0)
    alpha = 1e-2 * theta0.square().mean().sqrt()    # scale_parameter: alpha_t = RMS * rho
    torch.testing.assert_close(one_step(weight_decay=0.1, decay_scale="alpha"),
                               theta0 * (1 - alpha * 0.1) - step, rtol=1e-14, atol=0)
    # l2: the decay goes into G_t before the second moment
    p = theta0.clone().requires_grad_()
    opt = optimlab.Adafactor([p], **kw)
    p.grad = torch.tensor([[0.3, -0.1], [0.2, 0.4]], dtype=torch.float64) + 0.1 * theta0
    opt.step()
    torch.testing.assert_close(one_step(weight_decay=0.1, wd_mode="l2"), p.detach(),
                               rtol=1e-14, atol=0)


# ------------------------------------------------------------------ memory, state, lr
def test_factored_memory_is_rows_plus_columns():
    n, m = 64, 48
    p = torch.zeros(n, m, requires_grad=True)
    q = torch.zeros(5, n, m, requires_grad=True)
    v = torch.zeros(n, requires_grad=True)
    opt = optimlab.Adafactor([p, q, v])
    for x in (p, q, v):
        x.grad = torch.randn_like(x)
    opt.step()
    sp, sq, sv = opt.state[p], opt.state[q], opt.state[v]
    assert set(sp) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}     # beta1=None: no m
    assert tuple(sp["exp_avg_sq_row"].shape) == (n,)
    assert tuple(sp["exp_avg_sq_col"].shape) == (m,)
    assert sum(t.numel() for t in sp.values() if torch.is_tensor(t)) == n + m
    assert tuple(sq["exp_avg_sq_row"].shape) == (5, n)
    assert tuple(sq["exp_avg_sq_col"].shape) == (5, m)
    assert sum(t.numel() for t in sq.values() if torch.is_tensor(t)) == 5 * (n + m)
    assert set(sv) == {"step", "exp_avg_sq"} and sv["exp_avg_sq"].numel() == n
    with_m = optimlab.Adafactor([p], beta1=0.9)
    with_m.step()
    assert tuple(with_m.state[p]["exp_avg"].shape) == (n, m)


@pytest.mark.parametrize("impl", IMPLS)
def test_unfactored_with_a_fixed_beta2_is_adam_without_momentum(impl):
    """``factored=False``, ``beta2``, no first moment, no clipping, a fixed step: the paper's
    section 7.1 identity, beta2_t = beta2 (1 - beta2^(t-1)) / (1 - beta2^t) makes V^_t Adam's
    bias-corrected v_t, so this is torch.optim.Adam with betas (0, beta2) and eps 0 (eps1 =
    1e-30 inside the root instead): 1e-12 in float64, 20 steps, on every path."""
    kw = dict(lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=math.inf, beta2=0.999,
              factored=False, relative_step=False, scale_parameter=False)
    pa, oa, pb, _ = run_lockstep(lambda p: optimlab.Adafactor(p, impl=impl, **kw),
                                 lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.0, 0.999),
                                                            eps=0.0),
                                 dtype=torch.float64, steps=20)
    assert max_param_diff(pa, pb) <= 1e-12
    assert all(set(oa.state[p]) == {"step", "exp_avg_sq"} for p in pa)
    assert sum(oa.state[p]["exp_avg_sq"].numel() for p in pa) == sum(p.numel() for p in pa)


def test_state_dict_round_trip_continues_identically():
    params = make_params(dtype=torch.float64)
    twin = clone_params(params)
    kw = dict(beta1=0.9, weight_decay=0.1)
    a = optimlab.Adafactor(params, **kw)
    for _ in range(5):
        for p in params:
            p.grad = torch.ones_like(p) * 0.1 + p.detach()
        a.step()
    b = optimlab.Adafactor(twin, **kw)
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        for opt, ps in ((a, params), (b, twin)):
            for p in ps:
                p.grad = torch.ones_like(p) * 0.1 + p.detach()
            opt.step()
    assert max_param_diff(params, twin) == 0.0
    assert b.state[twin[1]]["step"] == 10
    with pytest.raises(ValueError, match="state keys"):
        optimlab.Adafactor(clone_params(params)).load_state_dict(a.state_dict())  # no exp_avg


@pytest.mark.parametrize("options", [
    dict(), dict(relative_step=False, lr=3e-3), dict(warmup_init=True, beta1=0.9),
    dict(scale_parameter=False, weight_decay=0.1, decay_scale="alpha")])
def test_group_lr_is_never_written(options):
    params = make_params(dtype=torch.float64)
    opt = optimlab.Adafactor(params, **options)
    lr0 = opt.param_groups[0]["lr"]
    assert isinstance(lr0, float)
    for i in range(20):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert opt.param_groups[0]["lr"] == lr0
    opt.param_groups[0]["lr"] = 1e-3                  # a schedule's write is kept as is
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3
    hf = compat.hf.Adafactor(make_params())           # transformers would store None
    assert hf.param_groups[0]["lr"] == 1e-2


def test_nonfinite_gradient_skips_the_step():
    p = torch.ones(3, 2, requires_grad=True)
    opt = optimlab.Adafactor([p], beta1=0.9)
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.state[p]
    assert torch.equal(p.detach(), torch.ones(3, 2))


# ------------------------------------------------------------------ bad input
BAD = [
    (dict(lr=-1.0), "lr"),
    (dict(eps=1e-3), "eps"),
    (dict(eps=(-1.0, 1e-3)), r"eps\[0\]"),
    (dict(eps=(1e-30, -1.0)), r"eps\[1\]"),
    (dict(eps=(1e-30, float("nan"))), r"eps\[1\]"),
    (dict(clip_threshold=0.0), "clip_threshold"),
    (dict(decay_rate=0.5), "decay_rate"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta1=-0.1), "beta1"),
    (dict(beta2=1.0), "beta2"),
    (dict(beta2=-0.5), "beta2"),
    (dict(weight_decay=-1e-2), "weight_decay"),
    (dict(wd_mode="adamw"), "wd_mode"),
    (dict(eps1_placement="sqrt"), "eps1_placement"),
    (dict(momentum_of="grad"), "momentum_of"),
    (dict(decay_scale="rho"), "decay_scale"),
    (dict(decay_scale="alpha", wd_mode="l2", weight_decay=0.1), "decay_scale"),
    (dict(warmup_init=True, relative_step=False), "warmup_init"),
    (dict(nonfinite="nan"), "nonfinite"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[n.replace("\\", "") for _, n in BAD])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        optimlab.Adafactor([torch.zeros(2, requires_grad=True)], **kw)


def test_bad_group_override_is_rejected():
    opt = optimlab.Adafactor([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid beta1"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "beta1": 2.0})


@pytest.mark.parametrize("kw,name", [(dict(d=0.5), "d"), (dict(beta2_decay=0.1), "beta2_decay"),
                                     (dict(lr=-1.0), "lr"), (dict(lr=torch.ones(2)), "lr"),
                                     (dict(eps=(-1.0, 1e-3)), r"eps\[0\]")])
def test_compat_torch_rejects_what_torch_rejects(kw, name):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError):
        torch.optim.Adafactor(p, **kw)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        compat.torch.Adafactor(p, **kw)


def test_compat_torch_tensor_lr():
    opt = compat.torch.Adafactor([torch.zeros(2, requires_grad=True)], lr=torch.tensor(3e-3))
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=1e-3), "Cannot combine manual `lr` and `relative_step=True`"),
    (dict(warmup_init=True, relative_step=False, lr=1e-3), "requires `relative_step=True`"),
])
def test_compat_hf_rejects_what_transformers_rejects(kw, match):
    HFAdafactor = _hf()
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=match):
        HFAdafactor(p, **kw)
    with pytest.raises(ValueError, match=match):
        compat.hf.Adafactor(p, **kw)


def test_compat_hf_needs_lr_without_relative_step():
    HFAdafactor = _hf()
    p = torch.zeros(2, requires_grad=True)
    ref = HFAdafactor([p], relative_step=False)       # transformers fails only at step()
    p.grad = torch.ones(2)
    with pytest.raises(TypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.step()
    with pytest.raises(ValueError, match="Invalid lr"):
        compat.hf.Adafactor([p], relative_step=False)


def test_clamp_placement_refuses_an_eps1_whose_square_underflows():
    """eps1=1e-30 (the paper's, right for eps1_placement='grad_sq') with the clamp placement:
    eps1**2 underflows to 0 in float32 and a zero gradient row gave NaN on the first step.  It
    is refused, naming what works; float64 represents it, and eps1=None is machine epsilon."""
    def step(eps, dtype=torch.float32):
        p = torch.nn.Parameter(torch.ones(3, 4, dtype=dtype))
        opt = optimlab.Adafactor([p], eps=eps, eps1_placement="clamp")
        p.grad = torch.zeros(3, 4, dtype=dtype)
        opt.step()
        return p
    with pytest.raises(ValueError, match=r"eps\[0\]: 1e-30 .* underflows in float32.*eps=\(None"):
        step((1e-30, 1e-3))
    assert torch.isfinite(step((1e-30, 1e-3), torch.float64)).all()
    assert torch.isfinite(step((None, 1e-3))).all()
    assert torch.isfinite(step((1e-15, 1e-3))).all()
