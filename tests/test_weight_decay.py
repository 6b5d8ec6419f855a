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
from optimlab import compat
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


def _train(opt, params, steps, *schedulers, set_wd=None):
    """``steps`` updates on seeded noisy-quadratic gradients, each scheduler stepped after
    each; ``set_wd(t)`` before update t."""
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if set_wd is not None:
            set_wd(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
        opt.step()
        for sched in schedulers:
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

    _train(oa, pa, len(MULTIPLIERS), sa)
    _train(ob, pb, len(MULTIPLIERS), sb, set_wd=set_wd)
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
        _train(opt, params, len(MULTIPLIERS), torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: MULTIPLIERS[min(t, 5)]))
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_timescale_zero_means_no_decay_and_a_negative_tau_is_refused():
    pa, pb = _params(), _params()
    oa = optimlab.AdamW(pa, lr=LR0, weight_decay=0.0, wd_mode="timescale")
    ob = optimlab.AdamW(pb, lr=LR0, weight_decay=0.0)
    for opt, params in ((oa, pa), (ob, pb)):
        _train(opt, params, 3, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0))
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    with pytest.raises(ValueError, match="weight_decay"):
        optimlab.AdamW(_params(), weight_decay=-1.0, wd_mode="timescale")
    with pytest.raises(ValueError, match="timescale.*tau"):          # a lambda passed as tau
        optimlab.AdamW(_params(), weight_decay=0.01, wd_mode="timescale")
    with pytest.raises(ValueError, match="wd_mode.*'lr_squared'"):
        optimlab.AdamW(_params(), weight_decay=0.1, wd_mode="squared")


# --------------------------------------------------------------------------- the wd schedule
WD_MULTIPLIERS = [0.0, 0.5, 1.0, 2.0, 1.5, 0.25]        # m_t, one per step


def _schedules(opt):
    return (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: MULTIPLIERS[min(t, 5)]),
            optimlab.LambdaWD(opt, lambda t: WD_MULTIPLIERS[min(t, 5)]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", SHRINKS)
@pytest.mark.parametrize("name", NAMES)
def test_a_wd_schedule_scales_each_modes_shrink(name, mode, impl):
    """Beside an lr schedule, m_t from `LambdaWD` multiplies the shrink of every mode:
    theta_T = theta_0 prod_t (1 - m_t c_t) (zero gradients, float64, 1e-12)."""
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = _make(name, params, mode, impl)
    lrs, wds = _schedules(opt)
    wd = WD.get(mode, WD_DEFAULT)
    factor = 1.0
    for t in range(len(MULTIPLIERS)):
        factor *= 1 - WD_MULTIPLIERS[t] * literal_shrink(mode, wd, LR0 * MULTIPLIERS[t], LR0)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        lrs.step()
        wds.step()
    for p, p0 in zip(params, start):
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-12, atol=1e-12)
    assert wds.get_last_multiplier() == [WD_MULTIPLIERS[5]] * len(opt.param_groups)
    assert all(g["weight_decay"] == wd for g in opt.param_groups)      # never rewritten


@pytest.mark.parametrize("name", NAMES)
def test_a_wd_schedule_scales_the_l2_coefficient(name):
    """``l2``: the gradient gets m_t lambda theta, exactly as if weight_decay were m_t lambda."""
    pa, pb = _params(), _params()
    oa = _make(name, pa, "l2", "auto")
    ob = _make(name, pb, "l2", "auto")
    wds = optimlab.LambdaWD(oa, lambda t: WD_MULTIPLIERS[min(t, 5)])

    def set_wd(t):
        for group in ob.param_groups:
            group["weight_decay"] = WD_DEFAULT * WD_MULTIPLIERS[t]

    _train(oa, pa, 6, wds)
    _train(ob, pb, 6, set_wd=set_wd)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_a_wd_schedule_drives_torch_optim_too_and_matches_optimlab():
    """On torch.optim.AdamW the scheduler scales ``weight_decay`` itself (from the
    ``initial_weight_decay`` it keeps); optimlab's torch-compatible AdamW under the same lr and
    wd schedules gives the same weights (float32, 1e-6)."""
    torch.manual_seed(0)
    pa = [torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    oa = torch.optim.AdamW(pa, lr=1e-2, weight_decay=0.5)
    ob = compat.torch.AdamW(pb, lr=1e-2, weight_decay=0.5)
    scheds = [(*_schedules(o),) for o in (oa, ob)]
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in pa]
        for opt, params, (lrs, wds) in ((oa, pa, scheds[0]), (ob, pb, scheds[1])):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
            lrs.step()
            wds.step()
    assert oa.param_groups[0]["initial_weight_decay"] == 0.5
    assert oa.param_groups[0]["weight_decay"] == 0.5 * WD_MULTIPLIERS[5]
    assert scheds[0][1].get_last_wd() == scheds[1][1].get_last_wd() == [0.5 * WD_MULTIPLIERS[5]]
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_wd_schedule_drives_sam_and_its_base():
    """SAM shares its base optimizer's groups: the multiplier reaches the base step."""
    def run(scheduled):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = optimlab.SAM(model.parameters(), optimlab.AdamW, rho=0.05, lr=1e-2,
                           weight_decay=0.5)
        wds = optimlab.LambdaWD(opt, lambda t: WD_MULTIPLIERS[min(t, 5)]) if scheduled else None
        g = torch.Generator().manual_seed(1)
        for t in range(6):
            if not scheduled:
                for group in opt.param_groups:
                    group["weight_decay"] = 0.5 * WD_MULTIPLIERS[t]
            x = torch.randn(8, 4, generator=g)
            opt.step(lambda: (opt.zero_grad(), model(x).square().mean().backward())[0])
            if wds is not None:
                wds.step()
        return [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_a_wd_schedule_resumes_from_its_state_dict():
    """Optimizer and wd scheduler saved after 3 updates and loaded into new ones continue
    as the uninterrupted run, bit for bit (`wd_schedule`'s multiplier is an object: its
    settings travel in the state dict)."""
    import io

    def build():
        params = _params()
        opt = optimlab.AdamW(params, lr=LR0, weight_decay=0.3, wd_mode="independent")
        return params, opt, optimlab.wd_schedule(opt, total=6, kind="cosine", final=4.0)
    pa, oa, wa = build()
    _train(oa, pa, 6, wa)
    pb, ob, wb = build()
    _train(ob, pb, 3, wb)
    buf = io.BytesIO()
    torch.save({"opt": ob.state_dict(), "wd": wb.state_dict(),
                "params": [p.detach() for p in pb]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    pc = _params()
    with torch.no_grad():
        for p, v in zip(pc, saved["params"]):
            p.copy_(v)
    oc = optimlab.AdamW(pc, lr=LR0, weight_decay=0.3, wd_mode="independent")
    wc = optimlab.wd_schedule(oc, total=1, kind="linear", final=0.0)     # replaced on load
    oc.load_state_dict(saved["opt"])
    wc.load_state_dict(saved["wd"])
    assert wc.last_epoch == 3 and wc.wd_lambdas[0].kind == "cosine"
    g = torch.Generator().manual_seed(1)
    for _ in range(3):                                 # the same gradients as steps 3..5 of pa
        [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in pc]
    for t in range(3):
        for p in pc:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
        oc.step()
        wc.step()
    assert all(torch.equal(a, c) for a, c in zip(pa, pc))


def test_wd_schedule_shapes_and_bad_input():
    from optimlab.wd_scheduler import wd_multiplier
    assert [wd_multiplier(t, total=4, kind="linear", final=3.0) for t in range(5)] == \
        [1.0, 1.5, 2.0, 2.5, 3.0]
    assert wd_multiplier(0, total=4, kind="cosine", final=0.0) == 1.0
    assert wd_multiplier(2, total=4, kind="cosine", final=0.0) == pytest.approx(0.5)
    assert wd_multiplier(9, total=4, kind="cosine", final=0.0) == pytest.approx(0.0)
    assert wd_multiplier(3, total=4) == 1.0
    opt = optimlab.AdamW(_params(), weight_decay=0.1)
    with pytest.raises(ValueError, match="kind"):
        optimlab.wd_schedule(opt, total=10, kind="step")
    with pytest.raises(ValueError, match="final"):
        optimlab.wd_schedule(opt, total=10, kind="linear", final=-1)
    with pytest.raises(ValueError, match="total"):
        optimlab.wd_schedule(opt, total=0, kind="linear")
    with pytest.raises(ValueError, match="multiplier -1.0 at update 0"):
        optimlab.LambdaWD(opt, lambda t: -1.0)
    with pytest.raises(ValueError, match="Expected 1 wd_lambdas, got 2"):
        optimlab.LambdaWD(opt, [lambda t: 1.0] * 2)
    with pytest.raises(ValueError, match="no 'weight_decay'"):
        optimlab.LambdaWD(torch.optim.LBFGS(_params()), lambda t: 1.0)


# --------------------------------------------------------------------------- optimlab convert
RECIPE = dict(lr=3e-3, steps=40, schedule="cosine", warmup=0.1, steps_per_epoch=8)
SOURCES = {"torch": 0.1, "optax": 0.1, "composer": 3e-4, "timescale": 3000.0,
           "timescale-epochs": 400.0, "normalized": 2e-3, "lr_squared": 0.2, "absolute": 1e-4}


def _as_optimlab(setting) -> dict:
    """The optimlab AdamW options that apply a converted setting."""
    v, k = setting.value, RECIPE["steps_per_epoch"]
    return {"torch": dict(wd_mode="decoupled", weight_decay=v),
            "optax": dict(wd_mode="decoupled", weight_decay=v),
            "composer": dict(wd_mode="independent", weight_decay=v),
            "timescale": dict(wd_mode="timescale", weight_decay=v),
            "timescale-epochs": dict(wd_mode="timescale", weight_decay=v * k),
            "normalized": dict(wd_mode="independent",
                               weight_decay=v / RECIPE["steps"] ** 0.5),
            "lr_squared": dict(wd_mode="lr_squared", weight_decay=v),
            "absolute": dict(wd_mode="absolute", weight_decay=v)}[setting.convention]


def _run_recipe(options, dtype=torch.float32, zero_grads=False):
    from optimlab.loop import schedule, warmup_updates
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(12, 6, generator=g, dtype=dtype).requires_grad_(),
              torch.randn(6, generator=g, dtype=dtype).requires_grad_()]
    opt = optimlab.Adam(params, lr=RECIPE["lr"], eps_placement="sqrt_v_hat", **options)
    sched = schedule(opt, total=RECIPE["steps"], kind=RECIPE["schedule"],
                     warmup=warmup_updates(RECIPE["warmup"], RECIPE["steps"]))
    for _ in range(RECIPE["steps"]):
        for p in params:
            p.grad = torch.zeros_like(p) if zero_grads else \
                torch.randn(p.shape, generator=g, dtype=dtype) + 0.1 * p.detach()
        opt.step()
        sched.step()
    return params


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_converted_recipe_trains_to_the_same_weights(source):
    """Every "exact" conversion of every source, run as optimlab options, ends with the
    source's weights (float32, 1e-6); every "same total" one shrinks the weights by the same
    factor over the run (zero gradients, float64, 1e-9)."""
    conv = optimlab.convert_weight_decay(convention=source, weight_decay=SOURCES[source],
                                         **RECIPE)
    want = _run_recipe(_as_optimlab(conv.source))
    start = _run_recipe({}, dtype=torch.float64, zero_grads=True)
    for setting in conv.settings:
        if setting.how in ("source", "exact"):
            got = _run_recipe(_as_optimlab(setting))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=setting.convention)
        else:
            assert setting.how == "same total"
            shrunk = _run_recipe(_as_optimlab(setting), dtype=torch.float64, zero_grads=True)
            ratio = (shrunk[0] / start[0]).mean().item()
            assert ratio == pytest.approx(conv.source.total, rel=1e-9), setting.convention
            assert setting.total == pytest.approx(conv.source.total, rel=1e-12)
    # a running reference: torch.optim.AdamW itself against the Composer-convention value
    if source == "torch":
        ref = [p.detach().clone().requires_grad_() for p in
               _run_recipe({}, zero_grads=True)]            # the same starting weights
        from optimlab.loop import schedule, warmup_updates
        g = torch.Generator().manual_seed(3)
        [torch.randn(12, 6, generator=g), torch.randn(6, generator=g)]
        opt = torch.optim.AdamW(ref, lr=RECIPE["lr"], weight_decay=SOURCES["torch"])
        sched = schedule(opt, total=RECIPE["steps"], kind=RECIPE["schedule"],
                         warmup=warmup_updates(RECIPE["warmup"], RECIPE["steps"]))
        for _ in range(RECIPE["steps"]):
            for p in ref:
                p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
            opt.step()
            sched.step()
        composer = _run_recipe(_as_optimlab(conv["composer"]))
        for a, b in zip(composer, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_round_trip_returns_the_input(source):
    conv = optimlab.convert_weight_decay(convention=source, weight_decay=SOURCES[source],
                                         **RECIPE)
    for setting in conv.settings:
        back = optimlab.convert_weight_decay(convention=setting.convention,
                                             weight_decay=setting.value, **RECIPE)[source]
        assert back.value == pytest.approx(SOURCES[source], rel=1e-9), setting.convention


def test_convert_on_the_command_line(capsys):
    from optimlab import cli
    argv = ["convert", "--from", "torch", "--lr", "3e-4", "--weight-decay", "0.1", "--steps",
            "10000", "--schedule", "cosine", "--steps-per-epoch", "1000"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "from torch 0.1" in out and "composer" in out and "same total" in out
    assert "weight_decay=3e-05" in out                       # Composer's lambda: lr x torch's
    assert cli.main(argv + ["--json"]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert {s["convention"] for s in data["settings"]} == set(optimlab.wd_convert.CONVENTIONS)
    for bad, message in (
            (["--weight-decay", "-1"], "Invalid weight_decay: -1.0"),
            (["--from", "timescale-epochs", "--steps-per-epoch", "0"], "steps_per_epoch"),
            (["--from", "absolute", "--weight-decay", "2"], "no convention means the same"),
            (["--from", "timescale", "--weight-decay", "0.5"], "did you mean a lambda")):
        code = cli.main([*argv[:-2], *bad] if "--steps-per-epoch" in bad else [*argv, *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (bad, err)


# --------------------------------------------------------------------------- wd_form
# Adafactor reads RMS(X_{t-1}) inside its step unless scale_parameter=False (then the
# compensated shrink around the kernel is the same update)
COMPENSABLE = {"adafactor": dict(scale_parameter=False)}


@pytest.mark.parametrize("form", ["fold", "compensated"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("mode", SHRINKS)
@pytest.mark.parametrize("name", NAMES)
def test_rounding_forms_are_the_same_update(name, mode, after, impl, form):
    """``wd_form="fold"`` and ``"compensated"`` change the rounding only: with gradients, in
    float64, they end where the default form does (1e-12), on every optimizer, mode,
    placement and path (Adafactor's decay scaled by alpha_t included, folded)."""
    extra = dict(COMPENSABLE.get(name, {}) if form == "compensated" else {},
                 wd_after_update=after)
    pa, pb = _params(), _params()
    oa = _make(name, pa, mode, impl, wd_form=form, **extra)
    ob = _make(name, pb, mode, impl, **extra)
    for opt, params in ((oa, pa), (ob, pb)):
        _train(opt, params, len(MULTIPLIERS),
               torch.optim.lr_scheduler.LambdaLR(opt, lambda t: MULTIPLIERS[min(t, 5)]))
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    assert all(("wd_compensation" in oa.state[p]) == (form == "compensated") for p in pa)


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adamw", "adafactor"])
def test_folded_decay_is_one_rounding_of_its_formula(name, after):
    """One float32 step, literally: delta is the step without decay (run in float64 from the
    same state), and the folded form gives theta + (k delta - c theta) rounded once from
    float64 (k = 1, or 1 - c after the update), to float32 rounding (98% of the weights bit
    for bit), where the plain forms, at c = 1e-8, give theta + delta."""
    c = 1e-8
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4000, generator=g).double()          # float32 values
    grad = torch.randn(4000, generator=g, dtype=torch.float64)
    kw = dict(wd_after_update=after, **({"decay_scale": "lr", "scale_parameter": False}
                                        if name == "adafactor" else {}))

    def step(dtype, wd, form=None):
        p = theta.to(dtype, copy=True).requires_grad_()
        opt = optimlab.create_optimizer([p], name, lr=1e-3, weight_decay=wd, wd_mode="absolute",
                                        wd_form=form, **kw)
        p.grad = grad.to(dtype)
        opt.step()
        return p.detach()
    delta = step(torch.float64, 0.0) - theta
    k = 1 - c if after else 1.0
    want = (theta + (k * delta - c * theta)).to(torch.float32)
    got = step(torch.float32, c, "fold")
    # one ulp of the result, plus the float32 rounding of delta itself (where theta + delta
    # cancels, that is more than an ulp of the result)
    bound = torch.finfo(torch.float32).eps * (want.double().abs() + delta.abs())
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert (got != want).float().mean() < 0.02
    plain = step(torch.float32, c, "add")
    assert torch.equal(plain, step(torch.float32, 0.0))       # the decay vanished
    assert not torch.equal(got, plain)


def _decay_applied(dtype, form, c, name="adamw", steps=1000, impl="auto"):
    """The decay the weights received over ``steps`` updates of zero gradients at shrink c per
    update, as a fraction of the intended (float64) amount."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5_000, generator=g).to(dtype)
    p = w0.clone().requires_grad_()
    opt = _make(name, [p], "absolute", impl, weight_decay=c, wd_form=form,
                **COMPENSABLE.get(name, {}))
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    intended = w0.double().abs().sum() * (1 - (1 - c) ** steps)
    return ((w0.double().abs() - p.detach().double().abs()).sum() / intended).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, c", [(torch.float32, 1e-8), (torch.float32, 3e-8),
                                      (torch.bfloat16, 1e-4)])
def test_compensated_decay_applies_all_of_it_in_low_precision(name, dtype, c):
    """At a shrink per update under half an ulp (float32: c < 6e-8; bfloat16: < 4e-3) the
    multiplied and added forms lose the decay (or, multiplied, apply another amount); the
    compensated form applies the intended decay over 1000 updates to 1%."""
    assert _decay_applied(dtype, "compensated", c, name) == pytest.approx(1.0, abs=0.01)
    worst = max(abs(_decay_applied(dtype, form, c, name) - 1) for form in ("multiply", "add"))
    assert worst > 0.5


def test_compensated_decay_state_resumes_exactly():
    """The rounding errors are optimizer state: saved and loaded, the run continues bit for
    bit; a state dict without them is refused (it is another optimizer's)."""
    def build():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(5000, generator=g).requires_grad_()
        return p, optimlab.AdamW([p], lr=1e-3, weight_decay=1e-5, wd_form="compensated")

    def steps(p, opt, ts):
        for t in ts:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
            opt.step()
    pa, oa = build()
    steps(pa, oa, range(6))
    pb, ob = build()
    steps(pb, ob, range(3))
    sd = ob.state_dict()
    assert sd["state"][0]["wd_compensation"].abs().max() > 0
    pc, oc = build()
    with torch.no_grad():
        pc.copy_(pb)
    oc.load_state_dict(sd)
    steps(pc, oc, range(3, 6))
    assert torch.equal(pa, pc)
    plain = optimlab.AdamW([pc], lr=1e-3, weight_decay=1e-5)
    with pytest.raises(ValueError, match="wd_compensation"):
        plain.load_state_dict(sd)


def test_wd_form_bad_input():
    with pytest.raises(ValueError, match="wd_form.*'compensated'"):
        optimlab.AdamW(_params(), weight_decay=0.1, wd_form="kahan")
    with pytest.raises(ValueError, match="scale_parameter=False"):
        optimlab.Adafactor(_params(), weight_decay=0.1, wd_form="compensated")
    with pytest.raises(ValueError, match="decay_scale='lr'"):
        optimlab.Adafactor(_params(), weight_decay=0.1, wd_form="compensated",
                           scale_parameter=False, decay_scale="alpha")
