"""The boundary between each algorithm and its kernels: the gate that decides what a fast
kernel may take (`optimlab._gate`), the typed C boundary (`optimlab._ext`), and the inputs that
used to crash or silently give other numbers.

Each bug the issue "One safe, typed boundary between each algorithm and its kernels" found has
a test named after it; their neighbours (aliased and overlapping memory, negative views,
expanded gradients, tensor subclasses, zero sizes) follow.  The cases that once crashed the
process run in a subprocess, so that a crash fails the test instead of ending the run.  The
property-based search over the whole space is tests/test_properties.py.

Tolerances: a case that a fast kernel may not take runs the reference kernel, so ``auto``
equals ``reference`` exactly; ``foreach`` runs the same kernel on TensorLists, on CPU the same
per-tensor operations: exactly equal too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import optimlab
from optimlab import _ext, _gate
from tests.helpers import init_gloo, run_workers

A = optimlab
# every optimizer with options that exercise its decay, momentum and eps choices
OPTIMIZERS = [
    ("sgd", lambda p, **k: A.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, **k)),
    ("adagrad", lambda p, **k: A.AdaGrad(p, lr=0.1, weight_decay=0.1, **k)),
    ("rmsprop", lambda p, **k: A.RMSProp(p, lr=0.01, momentum=0.9, centered=True, **k)),
    ("adam", lambda p, **k: A.Adam(p, lr=0.01, weight_decay=0.1, **k)),
    ("adamw", lambda p, **k: A.AdamW(p, lr=0.01, weight_decay=0.1, **k)),
    ("amsgrad", lambda p, **k: A.AMSGrad(p, lr=0.01, **k)),
    ("radam", lambda p, **k: A.RAdam(p, lr=0.01, weight_decay=0.1, wd_mode="decoupled", **k)),
    ("adafactor", lambda p, **k: A.Adafactor(p, beta1=0.9, weight_decay=0.1, **k)),
]
NAMES = [n for n, _ in OPTIMIZERS]
requires_kernels = pytest.mark.skipif(not _ext.available(),
                                      reason=f"optimlab's CPU kernels: {_ext.status()['reason']}")


def steps(make, params, grads, impl, n=3):
    """``n`` steps of ``make(params, impl=impl)`` with ``grads()`` (a list per step); returns
    (parameters, state tensors, the paths the last step ran)."""
    opt = make(params, impl=impl)
    for _ in range(n):
        for p, g in zip(params, grads()):
            p.grad = g
        opt.step()
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v
              for k, v in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], state, opt.last_step_impls


def assert_equal(a, b):
    (pa, sa, _), (pb, sb, _) = a, b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype, k
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
            else:
                assert x[k] == y[k], k


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a crash there fails the caller's test)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


# ------------------------------------------------------------------ the bugs of the issue
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float64],
                         ids=["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_a_gradient_in_another_dtype_than_its_parameter_is_not_read_as_the_parameters(
        name, make, grad_dtype):
    """torch 2.13 lets a gradient have another dtype (``p.grad_dtype = None``); the fused
    kernel used to read a bf16 gradient of an fp32 weight as fp32 (a zero weight moved to
    2.7e36).  Such a bucket runs the reference (auto) or the multi-tensor kernel, with the
    reference's numbers; impl='fused' says why it cannot."""
    def make_params():
        ps = [nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4)), nn.Parameter(torch.zeros(5))]
        for p in ps:
            p.grad_dtype = None
        return ps
    g = torch.Generator().manual_seed(0)
    bank = [[torch.randn(3, 4, generator=g).to(grad_dtype), torch.randn(5, generator=g).to(grad_dtype)]
            for _ in range(3)]
    it = iter(bank * 3)
    ref = steps(make, make_params(), lambda: next(it), "reference")
    for impl in ("auto", "foreach"):
        it = iter(bank * 3)
        got = steps(make, make_params(), lambda: next(it), impl)
        assert "fused-cpu" not in got[2]
        assert_equal(got, ref)
    ps = make_params()
    for p, b in zip(ps, bank[0]):
        p.grad = b
    why = (r".*dtypes \(float32, " + str(grad_dtype).replace("torch.", "")
           if _ext.available() else "")
    with pytest.raises(RuntimeError, match=r"impl='fused'" + why):
        make(ps, impl="fused").step()
    assert torch.equal(ps[1].detach(), torch.zeros(5))     # refused before anything changed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_foreach_on_a_low_precision_list_gives_the_reference_numbers_on_cpu(dtype):
    """torch._foreach_mul_ rounds a Python scalar to a bf16/fp16 list's dtype (0.99 ->
    0.98828125) where Tensor.mul_ does not: RMSProp with momentum (buf.mul_(0.9)) on bf16
    weights drifted from the reference by ulps per step on impl="foreach", 30% of a momentum
    buffer after three steps (found by the property search).  TensorList passes such a scalar
    as a 0-dim tensor: on CPU the paths agree bit for bit again."""
    from optimlab._foreach import TensorList
    t = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    assert torch.equal(TensorList([t.clone()]).mul_(0.99).ts[0], t.clone().mul_(0.99))
    assert torch.equal((TensorList([t]) * 0.37).ts[0], t * 0.37)
    assert torch.equal((0.7 / TensorList([t])).ts[0], 0.7 / t)
    runs = []
    for impl in ("reference", "foreach"):
        g = torch.Generator().manual_seed(1)
        ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in ((7, 3), (5,))]
        opt = A.RMSProp(ps, lr=1e-2, momentum=0.9, centered=True, impl=impl)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob.last_step_impls == ("foreach",)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert all(torch.equal(oa.state[a][k], ob.state[b][k]) for a, b in zip(pa, pb)
               for k in ("square_avg", "grad_avg", "momentum_buffer"))


def test_a_bf16_gradient_of_a_large_fp32_weight_does_not_crash():
    """At 50M elements the same misread gradient made the kernel read past the end of its
    buffer and crash the process (run in a subprocess)."""
    proc = run_python("""
        import torch, optimlab
        p = torch.nn.Parameter(torch.zeros(50_000_000)); p.grad_dtype = None
        opt = optimlab.SGD([p], lr=0.1)
        p.grad = torch.zeros(50_000_000, dtype=torch.bfloat16)
        opt.step()
        assert bool((p == 0).all()), "a zero gradient moved the weight"
        print("ok", opt.last_step_impls)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok ('reference',)" in proc.stdout


def test_adafactor_on_a_parameter_with_a_zero_size_dimension_does_not_crash():
    """``optimlab.Adafactor`` on an (N, 0) parameter (``nn.Linear(0, 5)``) crashed the process
    under impl auto and fused (subprocess); every impl now leaves it as the reference does."""
    proc = run_python("""
        import torch, optimlab
        for shape in [(5, 0), (0, 5), (0,), (2, 0, 3), (3, 2, 0)]:
            outs = []
            for impl in ("reference", "auto", "foreach"):
                torch.manual_seed(0)
                m = torch.nn.Linear(3, 4)
                z = torch.nn.Parameter(torch.zeros(shape))
                ps = [z, *m.parameters()]
                opt = optimlab.Adafactor(ps, beta1=0.9, weight_decay=0.1, impl=impl)
                for _ in range(3):
                    for p in ps:
                        p.grad = torch.ones_like(p)
                    opt.step()
                outs.append([p.detach().clone() for p in ps])
            for out in outs[1:]:
                for a, b in zip(out, outs[0]):
                    assert torch.equal(a, b), (shape, a, b)
        m = torch.nn.Linear(0, 5)
        opt = optimlab.Adafactor(m.parameters(), impl="auto")
        m(torch.zeros(3, 0)).sum().backward()
        opt.step()
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused", "auto"])
@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_a_tensor_lr_works_on_every_path(name, make, impl):
    """``lr=torch.tensor(0.01)`` (torch.optim accepts one) was accepted, then
    impl='foreach' raised TypeError at step; it now equals the same float lr everywhere, and
    a scheduler that writes a float into the group keeps working."""
    if impl == "fused" and not _ext.available() and not name.startswith(("adam", "ams")):
        pytest.skip("no fused kernel without optimlab's CPU kernels")

    def run(lr):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
        opt = make(ps, impl=impl)
        for gr in opt.param_groups:
            gr["lr"] = lr
            gr["initial_lr"] = lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for t in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 0.5) * (t + 1)
            opt.step()
            sched.step()
        return [p.detach() for p in ps]
    for a, b in zip(run(torch.tensor(0.01)), run(0.01)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_meta_parameters_step_under_the_default_check(name, make, impl):
    """``meta`` parameters (shapes without data, as model-size tools use them) failed the
    default non-finite check ("Tensor.item() cannot be called on meta tensors"); they step as
    with torch.optim, and their state is created on the meta device.  Adafactor's step reads
    RMS values of the data (torch.optim.Adafactor fails on meta too): it says so."""
    ps = [nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
    for p in ps:
        p.grad = torch.empty_like(p)
    opt = make(ps, impl=impl)
    if name == "adafactor":           # its step reads RMS values of the data
        with pytest.raises(NotImplementedError, match="cannot step meta tensors"):
            opt.step()
        return
    opt.step()
    opt.step()
    for p in ps:
        st = opt.state[p]
        assert st["step"] == 2
        assert all(v.device.type == "meta" for v in st.values() if isinstance(v, torch.Tensor))


def _fsdp_worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    dist = torch.distributed
    from torch.distributed.fsdp import fully_shard
    try:
        results = {}
        for name, make in OPTIMIZERS:
            for impl in ("auto", "reference"):
                model = _fsdp_model()
                fully_shard(model)
                opt = make(model.parameters(), impl=impl)
                try:
                    for t in range(3):
                        x = torch.linspace(-1, 1, 8 * 5).reshape(8, 5) * (t + 1)
                        x = x[rank * 4:(rank + 1) * 4]           # this rank's half of the batch
                        model(x).square().mean().backward()
                        opt.step()
                        opt.zero_grad()
                    results[(name, impl)] = [p.full_tensor().detach() for p in model.parameters()]
                except NotImplementedError as e:
                    results[(name, impl)] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))   # 7 and 3 rows: uneven


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_fsdp2_parameters_do_not_crash_the_first_step(tmp_path):
    """On an FSDP2 model (``fully_shard``: DTensor parameters, 2 gloo processes)
    ``optimlab.AdamW(model.parameters())`` crashed the process on its first step: a DTensor's
    data pointer is 0.  A DTensor never reaches a kernel: the kernels take its local shard
    (tests/test_sharded.py); every optimizer steps, equal to a one-process run of the same
    global batch to float rounding."""
    run_workers(_fsdp_worker, 2, tmp_path, timeout=150)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, make in OPTIMIZERS:
        for a, b in zip(r0[(name, "auto")], r0[(name, "reference")]):   # fused vs reference
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert_equal((r0[(name, "auto")], [], ()), (r1[(name, "auto")], [], ()))
        model = _fsdp_model()                            # one process, the whole batch
        opt = make(model.parameters())
        for t in range(3):
            x = torch.linspace(-1, 1, 8 * 5).reshape(8, 5) * (t + 1)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(r0[(name, "auto")], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ their neighbours
def _alias(_):
    p = nn.Parameter(torch.linspace(-1, 1, 100))
    return [p], lambda: [p.detach()]                   # the gradient is the parameter


def _overlapping_views(_):
    base = torch.linspace(-1, 1, 200)
    a, b = nn.Parameter(base[:120]), nn.Parameter(base[80:])
    return [a, b], lambda: [torch.ones(120), torch.full((120,), 0.5)]


def _shared_gradient(_):
    a, b = nn.Parameter(torch.linspace(-1, 1, 100)), nn.Parameter(torch.linspace(0, 1, 100))
    g = torch.linspace(1, 2, 100)
    return [a, b], lambda: [g, g]                      # read-only sharing: fused may take it


def _negative_view(_):
    p = nn.Parameter(torch.linspace(-1, 1, 100))
    return [p], lambda: [torch._neg_view(torch.linspace(1, 2, 100))]


def _expanded(_):
    p = nn.Parameter(torch.linspace(-1, 1, 100).reshape(10, 10))
    return [p], lambda: [torch.linspace(1, 2, 10).expand(10, 10)]


class _Sub(torch.Tensor):
    pass


def _subclass(_):
    p = nn.Parameter(torch.linspace(-1, 1, 100).as_subclass(_Sub))
    return [p], lambda: [torch.linspace(1, 2, 100).as_subclass(_Sub)]


def _zero_dim_and_empty(_):
    ps = [nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.zeros(0)),
          nn.Parameter(torch.zeros(3, 0)), nn.Parameter(torch.ones(4, 5))]
    return ps, lambda: [torch.full_like(p, 0.25) for p in ps]


def _channels_last(_):
    p = nn.Parameter(torch.linspace(-1, 1, 120).reshape(2, 3, 4, 5)
                     .contiguous(memory_format=torch.channels_last))
    return [p], lambda: [torch.linspace(0, 1, 120).reshape(2, 3, 4, 5)
                         .contiguous(memory_format=torch.channels_last)]


NEIGHBOURS = [("aliased-grad", _alias, False), ("overlapping-views", _overlapping_views, False),
              ("shared-grad", _shared_gradient, True), ("neg-view", _negative_view, False),
              ("expanded-grad", _expanded, False), ("subclass", _subclass, False),
              ("0-dim-and-empty", _zero_dim_and_empty, True),
              ("channels-last", _channels_last, True)]


@pytest.mark.parametrize("case,build,fusable", NEIGHBOURS, ids=[c[0] for c in NEIGHBOURS])
@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_odd_tensors_give_the_references_numbers(name, make, case, build, fusable):
    """Memory that a kernel would write while another tensor reads it, negative views,
    expanded gradients, subclasses, zero sizes: the same numbers on every path.  Where a
    fused kernel may take the tensors (read-only sharing, channels_last, the non-empty
    tensors of a group with empty ones) it does and agrees to float rounding."""
    ref = steps(make, *build(0), "reference")
    for impl in ("auto", "foreach"):
        got = steps(make, *build(0), impl)
        fused = {"fused-cpu", "torch-fused"} & set(got[2])
        if fused:                  # a fused kernel took (some of) them: float rounding
            assert fusable, (case, got[2])
            for a, b in zip(got[0], ref[0]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert_equal(got, ref)
        if impl == "auto" and fusable and _ext.available() and \
                not (name == "adafactor" and case == "channels-last"):
            assert "fused-cpu" in got[2], got[2]


@requires_kernels
def test_impl_fused_on_overlapping_memory_runs_the_reference():
    """The kernel finds shared memory only when it is called; rather than fail halfway through
    a step, impl='fused' then runs the reference, which is the only defined result."""
    ps, grads = _alias(0)
    got = steps(lambda p, **k: A.AdamW(p, lr=0.1, **k), ps, grads, "fused")
    assert got[2] == ("reference",)
    assert_equal(got, steps(lambda p, **k: A.AdamW(p, lr=0.1, **k), *_alias(0), "reference"))


@requires_kernels
@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_fused_steps_bump_the_version_counter(name, make):
    """A fused kernel writes through data pointers; the shell bumps each parameter's version
    as an in-place op would, so autograd still refuses a graph whose saved parameter changed."""
    p = nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    opt = make([p])
    loss = (p * p).sum()
    p.grad = torch.ones_like(p)
    v0 = p._version
    opt.step()
    assert opt.last_step_impls == ("fused-cpu",)
    assert p._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=NAMES)
def test_impl_fused_refuses_before_it_writes_anything(name, make):
    """A group with one tensor no fused kernel takes: impl='fused' raises before any bucket
    of the step has run (nothing moved, no step counted)."""
    ps = [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    opt = make(ps, impl="fused")
    for p in ps:
        p.grad = torch.full_like(p, 0.5)
    with pytest.raises(RuntimeError, match="impl='fused'"):
        opt.step()
    assert torch.equal(ps[0].detach(), torch.ones(4, 3))
    assert all(opt.state[p].get("step", 0) == 0 for p in ps)


def test_the_non_finite_check_sees_through_subclasses_and_skips_meta():
    from optimlab._common import all_finite
    assert all_finite([torch.empty(3, device="meta")])
    assert not all_finite([torch.tensor([1.0, float("nan")]).as_subclass(_Sub)])
    assert not all_finite([torch._neg_view(torch.tensor([1.0, float("inf")]))])
    assert all_finite([torch.zeros(0), torch.ones(3, 0), torch.ones(4).expand(2, 4)])
    assert not all_finite([torch.tensor([float("nan")]).expand(3)])


# ------------------------------------------------------------------ the boundary itself
@requires_kernels
def test_the_library_layout_is_the_declarations():
    """The compiled library reports offsetof/sizeof of every struct of the generated header;
    they equal the ctypes layout of the Python declarations, and each kernel's row packer has
    the tensor struct's size and offsets."""
    import ctypes
    import struct as pystruct
    lib = _ext.load()
    assert lib.optimlab_layout().decode() == _ext._expected_layout()
    structs = _ext._ctypes_structs()
    for k in _ext._KERNELS.values():
        st = structs[k.tensor_struct]
        packer = _ext._packer(k)
        assert packer.size == ctypes.sizeof(st)
        offsets = [getattr(st, f).offset for f, _ in k.tensor_fields()]
        fmt = packer.format[1:]
        assert offsets == [pystruct.calcsize("=" + fmt[:i]) for i in range(len(fmt))]


def test_the_header_is_generated_from_the_declarations():
    """Every field of every hyper-parameter and per-tensor dataclass is a member of its C
    struct, by name and in order: the kernels read hp->lr, never hp[0]."""
    import dataclasses
    header = _ext.header()
    for k in _ext._KERNELS.values():
        for cls, struct_name in ((k.hyper, k.hyper.__name__), (k.scalars, k.tensor_struct)):
            body = header.split(f"struct {struct_name} {{", 1)[1].split("};", 1)[0]
            members = [line.strip().rstrip(";").split()[-1] for line in body.strip().splitlines()]
            names = [f.name for f in dataclasses.fields(cls)]
            assert [m for m in members if m in names] == names, struct_name


@requires_kernels
def test_each_kernel_runs_exactly_its_declared_dtype_combinations():
    """Each declared (parameter, gradient, state) combination runs; a combination the gate
    would never let through (an fp16 gradient of an fp32 weight) is refused by the kernel
    itself, before it writes anything."""
    for name, make in OPTIMIZERS:
        spec = make([nn.Parameter(torch.ones(1))]).fused
        for pd, gd, sd in sorted(spec.dtypes, key=str):
            p = nn.Parameter(torch.linspace(1, 2, 6, dtype=pd).reshape(2, 3))
            p.grad_dtype = None
            p.grad = torch.full((2, 3), 0.5, dtype=gd)
            kw = {"state_dtype": sd} if sd != pd else {}
            opt = make([p], impl="fused", **kw)
            opt.step()
            assert opt.last_step_impls == ("fused-cpu",), (name, pd, gd, sd)
        # the kernel's own refusal: a row the gate would not have built
        p = nn.Parameter(torch.ones(2, 3))
        p.grad_dtype = None
        p.grad = torch.ones(2, 3, dtype=torch.float16)
        opt = make([p], impl="reference")
        hp = opt.Hyper.of(opt.param_groups[0], [p])
        states = opt._group_states(opt.param_groups[0], [p])
        scalars = opt._scalars(hp, [p], states)
        key = _gate.buckets([p], [p.grad], states)[0][0]
        before = p.detach().clone()
        with pytest.raises(RuntimeError, match="DTYPES"):
            _ext.run(spec, [hp], opt._fused_rows([p], [p.grad], states, scalars, key), opt._call(key))
        assert torch.equal(p.detach(), before)


@requires_kernels
def test_the_kernel_refuses_a_call_whose_written_memory_overlaps():
    """The check every kernel makes before writing: an aliased gradient returns OVERLAP."""
    p = nn.Parameter(torch.ones(8))
    p.grad = p.detach()
    opt = A.SGD([p], lr=0.1, momentum=0.9)
    hp = opt.Hyper.of(opt.param_groups[0], [p])
    states = opt._group_states(opt.param_groups[0], [p])
    scalars = opt._scalars(hp, [p], states)
    key = _gate.buckets([p], [p.grad], states)[0][0]
    rc = _ext.run(opt.fused, [hp], opt._fused_rows([p], [p.grad], states, scalars, key), opt._call(key))
    assert rc == _ext.Rc.OVERLAP
    assert torch.equal(p.detach(), torch.ones(8))


def test_weight_decay_is_one_object_every_path_takes():
    """`WeightDecay.of` is the only reading of wd_mode / wd_after_update / initial_lr."""
    from optimlab._common import ShrinkForm, WeightDecay
    g = dict(lr=0.5, initial_lr=2.0, weight_decay=0.1)
    assert WeightDecay.of(dict(g, wd_mode="l2")) == WeightDecay(l2=0.1)
    assert WeightDecay.of(dict(g, wd_mode="decoupled")) == WeightDecay(lam=0.1, factor=0.5)
    assert WeightDecay.of(dict(g, wd_mode="independent", wd_after_update=True)) == \
        WeightDecay(lam=0.1, factor=0.25, after=True, form=ShrinkForm.ADD)
    assert WeightDecay.of(dict(g, weight_decay=torch.tensor(0.0), wd_mode="l2")) == WeightDecay()
    p = torch.full((3,), 2.0)
    WeightDecay(lam=0.1, factor=0.5).before(p)
    assert torch.equal(p, torch.full((3,), 2.0 * (1 - 0.05)))


def test_an_infinite_weight_stays_infinite_where_no_decay_applies():
    """The kernels apply an option that is off as no arithmetic at all: an fma(0, theta, g)
    would turn an infinite weight into NaN where the reference adds nothing."""
    for name, make in OPTIMIZERS:
        if name == "adafactor":
            make = lambda p, **k: A.Adafactor(p, lr=0.01, relative_step=False,     # noqa: E731
                                              scale_parameter=False, **k)
        outs = {}
        for impl in ("reference", "auto"):
            p = nn.Parameter(torch.tensor([float("inf"), 1.0, -float("inf"), 2.0] * 3).reshape(3, 4))
            opt = make([p], impl=impl, nonfinite="ignore")
            for gr in opt.param_groups:
                gr["weight_decay"] = 0.0
            p.grad = torch.full_like(p, 0.5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            outs[impl] = p.detach().clone()
        torch.testing.assert_close(outs["auto"], outs["reference"], equal_nan=True,
                                   rtol=1e-6, atol=1e-6, msg=name)


def test_every_simd_loop_of_the_kernels_is_vectorized(tmp_path):
    """The kernels are memory-bound only if their inner loops vectorize; a compiler quirk can
    silently stop that (a select on a ``bool`` did: AdamW's step went from 59 to 150 ms).  Each
    source is compiled as the build compiles it, with GCC's vectorization report: the loop
    under every ``#pragma omp simd`` is vectorized in every instantiation."""
    import re
    cxx = _ext._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "GCC" not in version and "g++" not in version and "Free Software" not in version:
        pytest.skip("the vectorization report is GCC's")
    (tmp_path / "optimlab_structs.h").write_text(_ext.header())
    procs = {}
    for src in _ext._sources():
        cmd = [cxx, *_ext._BASE_FLAGS, *_ext._arch_flags(), "-fopenmp", f"-I{tmp_path}",
               f"-I{_ext._CSRC}", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")),
               "-fopt-info-vec-all"]
        procs[src] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
    for src, proc in procs.items():
        report = proc.communicate()[1]
        assert proc.returncode == 0, report[-2000:]
        lines = src.read_text().splitlines()
        at = re.compile(rf"{re.escape(src.name)}:(\d+):\d+: "
                        r"(optimized: loop vectorized|missed: couldn't vectorize loop)")
        verdicts = [(int(m.group(1)), m.group(2)) for m in at.finditer(report)]
        for i, line in enumerate(lines):
            if not line.strip().startswith("#pragma omp simd"):
                continue
            # GCC names the loop by the pragma, the `for` or a statement of the body: take
            # every verdict between the pragma and the loop's closing brace
            depth, end = 0, i + 1
            for end in range(i + 1, len(lines)):
                depth += lines[end].count("{") - lines[end].count("}")
                if depth <= 0 and "{" in "".join(lines[i + 1:end + 1]):
                    break
            mine = [v for n, v in verdicts if i + 1 <= n <= end + 1]
            assert mine, f"{src.name}:{i + 1}: no vectorization verdict"
            missed = sum(not v.startswith("optimized") for v in mine)
            assert missed == 0, f"{src.name}:{i + 1}: {missed} of {len(mine)} not vectorized"
