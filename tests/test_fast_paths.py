"""The fast paths against the ground truth (torch.optim's test policy): for every optimizer and
a table of options, ``impl="foreach"`` and ``impl="fused"`` step in lock-step with
``impl="reference"`` (the readable per-tensor kernels that the parity tests tie to torch.optim,
transformers, Composer and CS224N) and must end with the same parameters and state.

Tolerances, after 100 steps of the noisy quadratic of tests/helpers.py (gradient = noise +
0.5 theta, so differences feed back) under a cosine lr schedule:

* foreach on CPU: bit for bit (torch's CPU foreach kernels run the per-tensor ops);
* fused (optimlab's CPU kernels, torch's fused Adam kernels), foreach on CUDA: float rounding,
  ``rtol = atol = 1e-5`` in float32 (1e-7 per step) and ``1e-12`` in float64;
* bf16 moments: their own rounding, see `test_bf16_moments`.

Also: the buckets of mixed dtypes, layouts and devices, state dicts carried across the
implementations, the non-finite check, what ``impl`` and the compat flags select, and CUDA
variants that skip without a GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import optimlab
from optimlab import _ext, compat
from optimlab._common import all_finite
from tests.helpers import clone_params, cosine_lr, gradient_sequence, make_params, set_grads

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# the classic small shapes, a 0-dim tensor, and tensors large enough for the kernels to split
# them across threads (>= 64K elements) and to use the row-parallel Adafactor passes
SHAPES = [(7,), (5, 3), (2, 4, 3), (1, 1), (), (260, 270), (70_000,), (2, 180, 200)]
STEPS = 100
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
NAN = float("nan")

A = optimlab
CASES = [
    ("sgd", lambda p, **k: A.SGD(p, lr=1e-2, **k)),
    ("sgd-nesterov-l2", lambda p, **k: A.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                              weight_decay=0.1, **k)),
    ("sgd-damp-independent-max", lambda p, **k: A.SGD(p, lr=1e-2, momentum=0.9, dampening=0.3,
                                                       weight_decay=0.1, wd_mode="independent",
                                                       maximize=True, **k)),
    ("sgd-decoupled-after", lambda p, **k: A.SGD(p, lr=1e-2, momentum=0.5, weight_decay=0.2,
                                                  wd_mode="decoupled", wd_after_update=True, **k)),
    ("sgd-momentum-fold", lambda p, **k: A.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.2,
                                                wd_mode="decoupled", wd_form="fold", **k)),
    ("adagrad", lambda p, **k: A.AdaGrad(p, lr=1e-2, **k)),
    ("adagrad-fold-after", lambda p, **k: A.AdaGrad(p, lr=1e-2, weight_decay=0.1,
                                                     wd_mode="decoupled", wd_after_update=True,
                                                     wd_form="fold", **k)),
    ("adagrad-decay-l2", lambda p, **k: A.AdaGrad(p, lr=1e-2, lr_decay=0.01, weight_decay=0.1,
                                                   initial_accumulator_value=0.1, **k)),
    ("adagrad-decoupled-after-max", lambda p, **k: A.AdaGrad(p, lr=1e-2, weight_decay=0.1,
                                                              wd_mode="decoupled",
                                                              wd_after_update=True,
                                                              maximize=True, **k)),
    ("rmsprop", lambda p, **k: A.RMSProp(p, lr=1e-3, **k)),
    ("rmsprop-centered-momentum-l2", lambda p, **k: A.RMSProp(p, lr=1e-3, momentum=0.9,
                                                               centered=True, weight_decay=0.1,
                                                               **k)),
    ("rmsprop-momentum-fold-max", lambda p, **k: A.RMSProp(p, lr=1e-3, momentum=0.9,
                                                            weight_decay=0.1, wd_mode="decoupled",
                                                            wd_form="fold", maximize=True, **k)),
    ("rmsprop-decoupled-after-max", lambda p, **k: A.RMSProp(p, lr=1e-3, weight_decay=0.1,
                                                              wd_mode="decoupled",
                                                              wd_after_update=True,
                                                              maximize=True, **k)),
    ("adam", lambda p, **k: A.Adam(p, lr=1e-2, **k)),
    ("adam-amsgrad-l2", lambda p, **k: A.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.1, **k)),
    ("adam-torch-adamw", lambda p, **k: A.Adam(p, lr=1e-2, weight_decay=0.1, wd_mode="decoupled",
                                               **k)),
    ("adam-independent", lambda p, **k: A.Adam(p, lr=1e-2, weight_decay=0.1,
                                               wd_mode="independent", **k)),
    ("adam-sqrt_v-nobias-max", lambda p, **k: A.Adam(p, lr=1e-2, eps=1e-3, eps_placement="sqrt_v",
                                                     correct_bias=False, maximize=True, **k)),
    ("adamw-cs224n", lambda p, **k: A.AdamW(p, lr=1e-2, weight_decay=0.1, **k)),
    ("adamw-cs224n-amsgrad", lambda p, **k: A.AdamW(p, lr=1e-2, weight_decay=0.3, amsgrad=True,
                                                    **k)),
    ("adamw-independent-after", lambda p, **k: A.AdamW(p, lr=1e-2, weight_decay=0.1,
                                                       wd_mode="independent", **k)),
    ("adamw-fold", lambda p, **k: A.AdamW(p, lr=1e-2, weight_decay=0.1, wd_form="fold", **k)),
    ("adam-decoupled-fold", lambda p, **k: A.Adam(p, lr=1e-2, weight_decay=0.1,
                                                  wd_mode="decoupled", wd_form="fold", **k)),
    ("radam", lambda p, **k: A.RAdam(p, lr=1e-2, **k)),
    ("radam-fold-after", lambda p, **k: A.RAdam(p, lr=1e-2, weight_decay=0.1,
                                                wd_mode="decoupled", wd_after_update=True,
                                                wd_form="fold", **k)),
    ("radam-hat-decoupled", lambda p, **k: A.RAdam(p, lr=1e-2, eps_placement="sqrt_v_hat",
                                                   weight_decay=0.1, wd_mode="decoupled", **k)),
    ("radam-rho4-nosgd-max", lambda p, **k: A.RAdam(p, lr=1e-2, rho_threshold=4.0,
                                                    degenerate_to_sgd=False, maximize=True, **k)),
    ("adafactor", lambda p, **k: A.Adafactor(p, **k)),
    ("adafactor-unfactored-beta2", lambda p, **k: A.Adafactor(p, beta1=0.9, beta2=0.999,
                                                              factored=False, **k)),
    ("adafactor-fold-alpha", lambda p, **k: A.Adafactor(p, beta1=0.9, weight_decay=0.1,
                                                        decay_scale="alpha", wd_form="fold", **k)),
    ("adafactor-clamp-fold-after", lambda p, **k: A.Adafactor(
        p, eps=(None, 1e-3), eps1_placement="clamp", weight_decay=0.1, decay_scale="lr",
        wd_after_update=True, wd_form="fold", **k)),
    ("adafactor-beta1-wd", lambda p, **k: A.Adafactor(p, beta1=0.9, weight_decay=0.1, **k)),
    ("adafactor-update-alpha-after-max",
     lambda p, **k: A.Adafactor(p, beta1=0.9, momentum_of="update", weight_decay=0.1,
                                decay_scale="alpha", wd_after_update=True, maximize=True, **k)),
    ("adafactor-fixed-l2-clip",
     lambda p, **k: A.Adafactor(p, lr=1e-3, relative_step=False, scale_parameter=False,
                                beta1=0.9, weight_decay=0.1, wd_mode="l2", clip_threshold=0.5,
                                **k)),
    ("adafactor-torch-clamp", lambda p, **k: A.Adafactor(p, eps=(None, 1e-3),
                                                         eps1_placement="clamp", weight_decay=0.1,
                                                         decay_scale="lr", upcast=False, **k)),
    ("adafactor-clamp-beta1-warmup", lambda p, **k: A.Adafactor(
        p, eps=(1e-15, 1e-3), eps1_placement="clamp", beta1=0.9, momentum_of="update",
        warmup_init=True, **k)),
]
IDS = [c[0] for c in CASES]
# torch's fused kernels shrink theta by a multiplication: they refuse wd_form="fold"
ADAM_CASES = [c for c in CASES if c[0].startswith("adam") and "fold" not in c[0]]


def noise_bank(params, seed=1, size=5):
    """``size`` sets of N(0, 1) gradient noise; step t uses set t % size, rolled by t
    elements (cheaper than fresh normal samples every step, and as good for comparing)."""
    bank = list(gradient_sequence(params, size, seed))
    for t in range(10 ** 9):
        yield [n.roll(t) if n.dim() else n for n in bank[t % size]]


def lockstep(make, impls, *, dtype=torch.float32, shapes=SHAPES, steps=STEPS, device="cpu",
             seed=0, threads=None):
    """One copy of the parameters per implementation, the same gradient noise for all, the
    same cosine lr schedule (``threads``: intra-op threads per implementation); returns
    {impl: (params, optimizer)}."""
    threads = threads or {}
    base = [p.detach().to(device) for p in make_params(shapes, dtype, seed)]
    runs = {}
    for impl in impls:
        ps = [p.clone().requires_grad_() for p in base]
        runs[impl] = (ps, make(ps, impl=impl))
    lrs = {impl: [g["lr"] for g in opt.param_groups] for impl, (_, opt) in runs.items()}
    for t, noise in zip(range(steps), noise_bank(base, seed + 1)):
        for impl, (ps, opt) in runs.items():
            for g, lr in zip(opt.param_groups, lrs[impl]):
                g["lr"] = cosine_lr(t, steps, lr)
            set_grads(ps, noise)
            if impl in threads:
                old = torch.get_num_threads()
                torch.set_num_threads(threads[impl])
                opt.step()
                torch.set_num_threads(old)
            else:
                opt.step()
    return runs


def assert_same(runs, ref="reference", exact=(), tol=None):
    """Parameters and every state entry of each run equal the reference run's."""
    ps_ref, opt_ref = runs[ref]
    for impl, (ps, opt) in runs.items():
        if impl == ref:
            continue
        kw = dict(rtol=0, atol=0) if impl in exact else tol or TOL[ps[0].dtype]
        for i, (a, b) in enumerate(zip(ps, ps_ref)):
            torch.testing.assert_close(a.detach(), b.detach(), **kw,
                                       msg=lambda m: f"{impl}: param {i}: {m}")
            sa, sb = opt.state[a], opt_ref.state[b]
            assert sa.keys() == sb.keys(), (impl, i)
            for k in sa:
                if isinstance(sb[k], torch.Tensor):
                    assert sa[k].dtype == sb[k].dtype, (impl, i, k)
                    torch.testing.assert_close(sa[k], sb[k], **kw,
                                               msg=lambda m: f"{impl}: state {i} {k!r}: {m}")
                else:
                    assert sa[k] == sb[k], (impl, i, k)


@pytest.fixture(autouse=True)
def one_thread():
    """The table runs on one intra-op thread: on a busy 2-core machine every parallel region
    of torch's ops (and of the kernels) can wait a scheduler time slice for its second thread,
    which made this file take minutes.  The multi-threaded kernel paths have their own test
    (`test_threaded_kernels_equal_the_reference`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_cpu_kernels():
    old = _ext.set_enabled(False)
    yield
    _ext.set_enabled(old)


requires_kernels = pytest.mark.skipif(not _ext.available(),
                                      reason=f"optimlab's CPU kernels: {_ext.status()['reason']}")


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,make", CASES, ids=IDS)
def test_fast_paths_equal_the_reference(name, make, dtype):
    """foreach always; optimlab's fused CPU kernels where they are built (without them the
    Adam family's torch-fused path has its own test below)."""
    impls = ("reference", "foreach") + (("fused",) if _ext.available() else ())
    # float64 runs the same kernels (templates) in the other dtype: fewer steps suffice
    runs = lockstep(make, impls, dtype=dtype, steps=STEPS if dtype == torch.float32 else 30)
    assert runs["foreach"][1].last_step_impls == ("foreach",)
    if "fused" in runs:
        assert runs["fused"][1].last_step_impls == ("fused-cpu",)
    assert runs["reference"][1].last_step_impls == ("reference",)
    assert_same(runs, exact=("foreach",))


def test_the_kernels_are_built_where_a_compiler_exists():
    """A clean machine with a C++ compiler (the CI) builds optimlab's CPU kernels on first use;
    a failed build must fail here, not silently skip the fused tests."""
    if not _ext._enabled:
        pytest.skip("disabled by OPTIMLAB_FUSED_CPU=0")
    if _ext._compiler() is None:
        pytest.skip("no C++ compiler: optimlab runs its PyTorch paths")
    st = _ext.status()
    assert st["available"], st["reason"]
    assert st["path"] and st["build_seconds"] is not None


@requires_kernels
@pytest.mark.parametrize("name,make", CASES, ids=IDS)
def test_threaded_kernels_equal_the_reference(name, make):
    """The kernels split tensors of >= 64K elements across threads (Adafactor: by rows, with
    per-thread column sums); two threads against the reference, a few steps."""
    runs = lockstep(make, ("reference", "fused"), steps=6, threads={"fused": 2})
    assert runs["fused"][1].last_step_impls == ("fused-cpu",)
    assert_same(runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,make", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
def test_adam_family_on_torchs_fused_kernels(name, make, dtype, no_cpu_kernels):
    """Without optimlab's CPU kernels the Adam family maps onto torch._fused_adam(w)_ with
    transformed scalars (`optimlab.adam.torch_fused_adam_scalars`), the CUDA path too."""
    runs = lockstep(make, ("reference", "fused"), dtype=dtype)
    assert runs["fused"][1].last_step_impls == ("torch-fused",)
    assert_same(runs)


def test_torchs_fused_kernels_refuse_the_folded_shrink(no_cpu_kernels):
    """torch's kernels multiply theta by 1 - lr' wd' before the step: they cannot round the
    shrink and the step as one sum.  impl="fused" says so before writing anything;
    impl="auto" takes the foreach path, which is the reference bit for bit."""
    make = dict(CASES)["adamw-fold"]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="cannot fold the shrink.*wd_form='fold'"):
        make([p], impl="fused").step()
    assert torch.equal(p.detach(), torch.ones(3))
    runs = lockstep(make, ("reference", "auto"), steps=5)
    assert runs["auto"][1].last_step_impls == ("reference",)
    assert_same(runs, exact=("auto",))


def test_without_cpu_kernels_auto_falls_back_and_fused_says_why(no_cpu_kernels):
    assert not _ext.available() and "disabled" in _ext.status()["reason"]
    runs = lockstep(CASES[1][1], ("reference", "auto"), steps=5)
    assert runs["auto"][1].last_step_impls == ("reference",)       # CPU: the per-tensor loop
    assert_same(runs, exact=("auto",))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="impl='fused'.*available: False"):
        optimlab.SGD([p], lr=0.1, impl="fused").step()
    assert torch.equal(p.detach(), torch.ones(3))


# ------------------------------------------------------------------ state memory
def test_bf16_moments():
    """``state_dtype=torch.bfloat16``: moments stored in bf16 (4 state bytes per parameter
    instead of 8), computed in fp32 and rounded once per step.  The fused kernel and the
    reference agree to fp32 rounding within a step; a one-ulp fp32 difference occasionally
    flips a bf16 rounding, so over many steps they agree to bf16 resolution."""
    make = lambda p, **k: A.AdamW(p, lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, **k)
    impls = ("reference", "foreach") + (("fused",) if _ext.available() else ())
    one = lockstep(make, impls, steps=1)
    ps, opt = one["reference"]
    st = opt.state[ps[5]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    n = sum(p.numel() for p in ps)
    state_bytes = sum(v.numel() * v.element_size() for p in ps for v in opt.state[p].values()
                      if isinstance(v, torch.Tensor))
    assert state_bytes == 4 * n
    assert_same(one, exact=("foreach",), tol=dict(rtol=1e-6, atol=1e-7))
    many = lockstep(make, impls, steps=STEPS)
    if "fused" in many:
        assert many["fused"][1].last_step_impls == ("fused-cpu",)
    # parameters to 1% of the distance they travelled; moments: at most 0.1% of them differ
    # at all (by a few bf16 ulps)
    assert_same(many, exact=("foreach",), tol=dict(rtol=2 ** -4, atol=1e-6))
    for impl in impls[1:]:
        for a, b in zip(many[impl][0], many["reference"][0]):
            for k in ("exp_avg", "exp_avg_sq"):
                x, y = many[impl][1].state[a][k], many["reference"][1].state[b][k]
                assert (x != y).float().mean().item() <= 1e-3, (impl, k)
    travelled = max((a.detach() - b).abs().max().item()
                    for a, b in zip(many["reference"][0], make_params(SHAPES)))
    for impl in impls[1:]:
        worst = max((a - b).abs().max().item()
                    for a, b in zip(many[impl][0], many["reference"][0]))
        assert worst <= 0.01 * travelled, (impl, worst, travelled)


def test_bf16_moments_need_a_known_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        A.Adam([torch.nn.Parameter(torch.ones(2))], state_dtype=torch.int8)


# ------------------------------------------------------------------ buckets
@requires_kernels
def test_mixed_dtypes_and_layouts_are_bucketed():
    """One group with fp32, fp64, bf16, a channels_last fp32 and a fp32 parameter whose grad
    is laid out differently: each bucket takes its own path, and all equal the reference."""
    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(5, 3, generator=g), torch.randn(300, 300, generator=g).double(),
              torch.randn(4, 6, generator=g).bfloat16(),
              torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
              torch.randn(6, 4, generator=g)]
        return [p.requires_grad_() for p in ps]

    def run(impl):
        ps = params()
        opt = A.AdamW(ps, lr=1e-2, weight_decay=0.1, impl=impl)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            for i, p in enumerate(ps):
                n = torch.randn(p.shape, generator=g).to(p.dtype)
                if i == 3:
                    n = n.contiguous(memory_format=torch.channels_last)
                if i == 4:                          # same values, transposed layout
                    n = n.t().contiguous().t()
                p.grad = n + 0.5 * p.detach()
            opt.step()
        return ps, opt

    ps_r, opt_r = run("reference")
    ps_a, opt_a = run("auto")
    assert opt_a.last_step_impls == ("fused-cpu", "reference")
    for a, b in zip(ps_a, ps_r):
        kw = TOL[torch.float32] if a.dtype != torch.bfloat16 else dict(rtol=0, atol=0)
        torch.testing.assert_close(a, b, **kw)
        assert opt_a.state[a]["exp_avg"].stride() == a.stride()
    with pytest.raises(RuntimeError, match="impl='fused'"):
        run("fused")                                # bf16 weights: no fused kernel


def test_bucket_keys_separate_state_dtypes():
    """fp32 state loaded for bf16 weights and bf16 state for fp32 weights sit in their own
    buckets (keyed by device, parameter, gradient and state dtypes)."""
    from optimlab._gate import buckets
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.zeros(2), torch.zeros(2)
    states = [{"exp_avg": torch.zeros(2)}, {"exp_avg": torch.zeros(2, dtype=torch.bfloat16)}]
    got = buckets([a, b], [a.grad, b.grad], states)
    assert sorted(idx for _, idx in got) == [[0], [1]]
    assert {key.state for key, _ in got} == {(("exp_avg", torch.float32),),
                                             (("exp_avg", torch.bfloat16),)}


def test_the_cheap_pass_finds_one_bucket_only_where_there_is_one():
    """`buckets` answers the common case (every tensor plain and contiguous, one dtype, the
    same state keys) in one cheap pass, and only that case: anything else is looked at tensor
    by tensor and gets buckets of its own."""
    from optimlab._gate import buckets

    def case(strided_grad=False, dtype_b=torch.float32, state_b=None, extra_key=False,
             grad_b=None):
        a = torch.zeros(4, 3, requires_grad=True)
        b = torch.zeros(4, 3, dtype=dtype_b, requires_grad=True)
        a.grad = torch.ones(4, 3)
        b.grad = torch.ones(3, 4, dtype=dtype_b).t() if strided_grad else torch.ones(4, 3,
                                                                                  dtype=dtype_b)
        if grad_b is not None:
            b.grad_dtype = None
            b.grad = grad_b
        sa = {"step": 1, "exp_avg": torch.zeros(4, 3)}
        sb = {"step": 1, "exp_avg": torch.zeros(4, 3, dtype=dtype_b) if state_b is None
              else state_b}
        if extra_key:
            sb["exp_avg_sq"] = torch.zeros(4, 3)
        return [a, b], [sa, sb]
    ps, sts = case()
    [(key, idx)] = buckets(ps, [p.grad for p in ps], sts)
    assert idx is None and key.plain and key.layout == "contiguous"
    for kw in (dict(strided_grad=True), dict(dtype_b=torch.float64),
               dict(state_b=torch.zeros(4, 3, dtype=torch.bfloat16)),
               dict(state_b=torch.zeros(3, 4).t()), dict(extra_key=True),
               dict(grad_b=torch.ones(4, 3, dtype=torch.bfloat16)),
               dict(grad_b=torch._neg_view(torch.ones(4, 3)))):
        ps, sts = case(**kw)
        got = buckets(ps, [p.grad for p in ps], sts)
        assert sorted(idx for _, idx in got) == [[0], [1]], kw
        odd = next(key for key, idx in got if idx == [1])
        assert not (odd.plain and odd.layout == "contiguous" and
                    odd.grad_dtype == odd.param_dtype == torch.float32 and
                    odd.state == (("exp_avg", torch.float32),)), kw


# ------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("name,make", [CASES[2], CASES[8], CASES[16], CASES[19], CASES[23]],
                         ids=[IDS[2], IDS[8], IDS[16], IDS[19], IDS[23]])
def test_state_dict_round_trips_across_implementations(name, make):
    """10 steps under one implementation, saved, resumed under each of the three; every run
    ends where an uninterrupted reference run ends (and resuming under the same
    implementation is bit for bit)."""
    impls = ("reference", "foreach") + (("fused",) if _ext.available() else ())
    for saver in impls:
        first = lockstep(make, (saver,), steps=10)
        ps, opt = first[saver]
        sd = copy.deepcopy(opt.state_dict())
        runs = {}
        for impl in impls:
            qs = [p.detach().clone().requires_grad_() for p in ps]
            o = make(qs, impl=impl)
            o.load_state_dict(sd)
            runs[impl] = (qs, o)
        g = torch.Generator().manual_seed(7)
        for _ in range(10):
            noise = [torch.randn(p.shape, generator=g) for p in ps]
            for qs, o in list(runs.values()) + [(ps, opt)]:
                set_grads(qs, noise)
                o.step()
        runs["uninterrupted"] = (ps, opt)
        assert_same(runs, ref=saver, exact=("uninterrupted",) + (("foreach",) if saver != "fused" else ()))


# ------------------------------------------------------------------ non-finite gradients
@pytest.mark.parametrize("bad", [-float("inf"), NAN])
@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("name,make", [CASES[1], CASES[5], CASES[8], CASES[15], CASES[19],
                                       CASES[22]],
                         ids=[IDS[1], IDS[5], IDS[8], IDS[15], IDS[19], IDS[22]])
def test_nonfinite_gradient_skips_the_whole_step(name, make, impl, bad):
    if impl == "fused" and not _ext.available():
        pytest.skip("no CPU kernels")
    ps = make_params(SHAPES)
    opt = make(ps, impl=impl)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        set_grads(ps, [torch.randn(p.shape, generator=g) for p in ps])
        opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    set_grads(ps, [torch.randn(p.shape, generator=g) for p in ps])
    ps[6].grad[69_999] = bad                          # the last element of a split tensor
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    after = opt.state_dict()["state"]
    for pid, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[pid][k])), (pid, k)


@requires_kernels
@pytest.mark.parametrize("where", ["vector", "matrix-last-row", "split-matrix", "first-step"])
def test_adafactor_checks_gradients_inside_its_kernel(where):
    """Adafactor's fused kernel runs pass 1 of every tensor of every group before writing
    anything and finds inf/NaN on the way (no separate read): the step over two groups is
    one kernel call, equals the group-by-group path, and a non-finite gradient anywhere leaves
    every parameter and state tensor as it was (on a skipped first step: no state at all)."""
    def make(ps, **kw):
        return A.Adafactor([{"params": ps[:4]},
                            {"params": ps[4:], "beta1": 0.9, "weight_decay": 0.1,
                             "scale_parameter": False}], **kw)
    shapes = [(7,), (5, 3), (2, 4, 3), (300, 400), (9,), (260, 270), (70_000,), (700, 200)]
    runs = {how: make_params(shapes) for how in ("checked", "ignore", "reference")}
    opts = {"checked": make(runs["checked"]), "ignore": make(runs["ignore"], nonfinite="ignore"),
            "reference": make(runs["reference"], impl="reference")}
    g = torch.Generator().manual_seed(5)
    steps = 0 if where == "first-step" else 4
    for _ in range(steps):
        noise = [torch.randn(s, generator=g) for s in shapes]
        for how, o in opts.items():
            set_grads(runs[how], noise)
            o.step()
    assert opts["checked"].last_step_impls == (("fused-cpu",) if steps else ())
    assert_same({k: (runs[k], opts[k]) for k in runs})
    ps, opt = runs["checked"], opts["checked"]
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    set_grads(ps, [torch.randn(s, generator=g) for s in shapes])
    bad = {"vector": (4, (8,)), "matrix-last-row": (5, (259, 269)),
           "split-matrix": (7, (699, 0)), "first-step": (3, (0, 0))}[where]
    ps[bad[0]].grad[bad[1]] = NAN
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    after = opt.state_dict()["state"]
    assert sorted(after) == sorted(state["state"])
    for pid, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[pid][k])), (pid, k)


@requires_kernels
def test_adafactor_overflowing_but_finite_gradient_is_not_skipped():
    """A finite gradient whose square overflows makes pass 1's sum inf; the kernel then tests
    the gradient's bits and, finding it finite, takes the step as the reference does."""
    runs = {how: make_params([(50, 40), (6,)]) for how in ("auto", "reference")}
    for how, ps in runs.items():
        opt = A.Adafactor(ps, impl=how)
        set_grads(ps, [torch.ones(50, 40), torch.ones(6)])
        ps[0].grad[3, 3] = 3e30
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert opt.skipped_steps == 0
    torch.testing.assert_close(runs["auto"], runs["reference"], equal_nan=True)


@requires_kernels
def test_the_finite_check_kernel():
    big = torch.randn(3 * 2 ** 16 + 5)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        ts = [big.to(dtype), torch.randn(3, 4).to(dtype), torch.zeros(0, dtype=dtype)]
        assert _ext.all_finite(ts) is True
        for where in (0, 2 ** 16 - 1, 2 ** 16, big.numel() - 1):
            for bad in (float("inf"), -float("inf"), NAN):
                t = ts[0].clone()
                t[where] = bad
                assert _ext.all_finite([ts[1], t]) is False, (dtype, where, bad)
    # what the kernel does not take is left to the caller (and all_finite checks it)
    assert _ext.all_finite([torch.ones(4, 4).t()[::2]]) is None
    assert _ext.all_finite([torch.ones(3, dtype=torch.int64)]) is None
    odd = torch.ones(8, 8)[::2]
    odd[1, 1] = NAN
    assert all_finite([odd]) is False


def test_all_finite_without_kernels_tells_overflow_from_inf(no_cpu_kernels):
    huge = torch.full((10,), 3e38)                    # finite, but its 2-norm overflows
    assert all_finite([huge, torch.ones(3)]) is True
    huge[3] = float("inf")
    assert all_finite([huge]) is False
    assert all_finite([torch.tensor([1.0, NAN])]) is False


def test_a_finite_grad_norm_from_the_loop_replaces_the_check():
    """``step(grad_norm=...)``: a finite norm (clip_grad_norm_'s return value) proves the
    gradients finite; a non-finite one falls back to the exact check."""
    make = CASES[15][1]
    runs = {}
    for how in ("plain", "norm"):
        ps = make_params(SHAPES)
        opt = make(ps)
        for _, noise in zip(range(5), noise_bank(ps)):
            set_grads(ps, noise)
            norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step(grad_norm=norm) if how == "norm" else opt.step()
        runs[how] = (ps, opt)
    assert_same(runs, ref="plain", exact=("norm",))
    ps, opt = runs["norm"]
    before = [p.detach().clone() for p in ps]
    ps[0].grad[0] = NAN
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(grad_norm=float("nan"))              # not finite: the exact check decides
    assert all(torch.equal(a, b) for a, b in zip(ps, before)) and opt.skipped_steps == 1
    ps[0].grad[0] = 1e30
    opt.step(grad_norm=float("inf"))                  # overflowed norm, finite gradients
    assert not torch.equal(ps[1].detach(), before[1]) and opt.skipped_steps == 1


# ------------------------------------------------------------------ selection
def test_impl_is_validated_and_kept_by_copies():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="impl"):
        A.Adam([p], impl="cuda")
    opt = A.RMSProp([p], impl="foreach", nonfinite="raise")
    clone = copy.deepcopy(opt)
    assert clone.impl == "foreach" and clone.nonfinite == "raise"


@pytest.mark.parametrize("flags,impl", [
    (dict(), "auto"), (dict(fused=True), "fused"), (dict(foreach=True), "foreach"),
    (dict(foreach=False), "reference"), (dict(fused=False), "foreach"),
    (dict(foreach=False, fused=False), "reference")])
def test_compat_torch_flags_select_the_implementation(flags, impl):
    p = [torch.nn.Parameter(torch.ones(2))]
    assert compat.torch.AdamW(p, **flags).impl == impl
    assert compat.torch.Adam(p, **flags).impl == impl
    assert compat.torch.SGD(p, **flags).impl == impl
    assert compat.torch.Adagrad(p, **flags).impl == impl
    if "fused" not in flags:
        assert compat.torch.RMSprop(p, **flags).impl == impl
        assert compat.torch.RAdam(p, **flags).impl == impl
        assert compat.torch.Adafactor(p, **flags).impl == impl


def test_compat_torch_rejects_foreach_and_fused_together():
    with pytest.raises(ValueError, match="cannot be `True` together"):
        compat.torch.AdamW([torch.nn.Parameter(torch.ones(2))], foreach=True, fused=True)


def test_other_compat_constructors_take_impl():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert compat.hf.Adafactor(p, impl="foreach").impl == "foreach"
    assert compat.composer.DecoupledAdamW(p, impl="reference").impl == "reference"
    assert compat.composer.DecoupledSGDW(p, lr=0.1, impl="fused").impl == "fused"
    assert compat.cs224n.AdamW(p, impl="foreach").impl == "foreach"


@requires_kernels
def test_fast_path_reproduces_torch_optim_to_float_rounding():
    """The default path (fused on CPU) against torch.optim itself, relative tolerance."""
    pairs = [(lambda p: compat.torch.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
             (lambda p: compat.torch.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
              lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)),
             (lambda p: compat.torch.RAdam(p, lr=1e-2), lambda p: torch.optim.RAdam(p, lr=1e-2)),
             (lambda p: compat.torch.Adafactor(p), lambda p: torch.optim.Adafactor(p))]
    for ours, theirs in pairs:
        base = make_params(SHAPES)
        pa, pb = clone_params(base), clone_params(base)
        oa, ob = ours(pa), theirs(pb)
        for _, noise in zip(range(50), noise_bank(base)):
            set_grads(pa, noise)
            set_grads(pb, noise)
            oa.step()
            ob.step()
        assert oa.last_step_impls == ("fused-cpu",)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


# ------------------------------------------------------------------ CUDA
@cuda_only
@pytest.mark.parametrize("name,make", CASES, ids=IDS)
def test_cuda_fast_paths_equal_the_reference(name, make):
    runs = lockstep(make, ("reference", "foreach", "auto"), device="cuda")
    expected = ("torch-fused",) if name.startswith("adam") and "bf16" not in name else ("foreach",)
    assert runs["auto"][1].last_step_impls == expected
    assert_same(runs)


@cuda_only
def test_cuda_mixed_devices_and_bf16_moments():
    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(5, 3, generator=g).requires_grad_(),
                torch.randn(300, 300, generator=g).cuda().requires_grad_(),
                torch.randn(7, generator=g).cuda().double().requires_grad_()]

    for kw in (dict(), dict(state_dtype=torch.bfloat16)):
        runs = {}
        for impl in ("reference", "auto"):
            ps = params()
            opt = A.AdamW(ps, lr=1e-2, weight_decay=0.1, impl=impl, **kw)
            g = torch.Generator().manual_seed(1)
            for _ in range(20):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g).to(p) + 0.5 * p.detach()
                opt.step()
            runs[impl] = (ps, opt)
        tol = dict(rtol=2 ** -7, atol=1e-5) if kw else None
        assert_same(runs, tol=tol)


@cuda_only
def test_cuda_nonfinite_gradient_skips():
    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = A.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone()
    p.grad[-1] = NAN
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    assert torch.equal(p.detach(), before) and opt.skipped_steps == 1
