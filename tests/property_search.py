"""The property behind tests/test_properties.py, run in a process of its own (a crash there
fails that test instead of ending the run).

    python -m tests.property_search [--examples N] [--seed S]

For an optimizer, its hyper-parameters, the parameters' dtype, shape and memory layout, the
gradients' dtype (``p.grad_dtype = None``) and layout, the state's dtype (a state dict cast
to it and loaded) and an implementation, drawn by hypothesis: ``impl`` ends three steps with
the reference's parameters and state, to the tolerance of the narrowest dtype involved, or
raises the reference's exception (impl='fused' may instead refuse with its reason, before it
writes anything).  Each example is printed before it runs, so a crash names it.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optimlab

SHAPES = [(), (1,), (7,), (0,), (5, 0), (0, 5), (1, 1), (3, 4), (2, 3, 4), (2, 1, 3, 2),
          (3, 2, 4, 5), (300, 240)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}
STEPS = 3


def _wd(draw):
    wd = draw(st.sampled_from([0.0, 0.1]))
    return dict(weight_decay=wd, wd_mode=draw(st.sampled_from(optimlab.WD_MODES)),
                wd_after_update=draw(st.booleans()),
                wd_form=draw(st.sampled_from([None, None, *optimlab.WD_FORMS])))


@st.composite
def optimizers(draw):
    """(name, constructor keyword arguments)."""
    name = draw(st.sampled_from(["sgd", "adagrad", "rmsprop", "adam", "adamw", "amsgrad",
                                 "radam", "adafactor"]))
    kw: dict = {"maximize": draw(st.booleans())}
    lr = draw(st.sampled_from([1e-2, 0.1]))
    if name != "adafactor":
        kw.update(_wd(draw))
        kw["lr"] = torch.tensor(lr) if draw(st.booleans()) else lr
    if name == "sgd":
        kw["momentum"] = draw(st.sampled_from([0.0, 0.9]))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["dampening"] = 0.0 if kw["nesterov"] else draw(st.sampled_from([0.0, 0.3]))
    elif name == "adagrad":
        kw.update(lr_decay=draw(st.sampled_from([0.0, 0.01])),
                  initial_accumulator_value=draw(st.sampled_from([0.0, 0.1])),
                  eps=draw(st.sampled_from([1e-10, 1e-3])))
    elif name == "rmsprop":
        kw.update(alpha=draw(st.sampled_from([0.99, 0.3])),
                  momentum=draw(st.sampled_from([0.0, 0.9])), centered=draw(st.booleans()))
    elif name in ("adam", "adamw", "amsgrad"):
        kw.update(betas=draw(st.sampled_from([(0.9, 0.999), (0.3, 0.9)])),
                  eps=draw(st.sampled_from([1e-8, 1e-3])),
                  eps_placement=draw(st.sampled_from(optimlab.EPS_PLACEMENTS)),
                  correct_bias=draw(st.booleans()),
                  state_dtype=draw(st.sampled_from([None, None, torch.bfloat16, torch.float32])))
        if name == "adam":
            kw["amsgrad"] = draw(st.booleans())
    elif name == "radam":
        kw.update(eps_placement=draw(st.sampled_from(optimlab.EPS_PLACEMENTS)),
                  rho_threshold=draw(st.sampled_from([4.0, 5.0])),
                  degenerate_to_sgd=draw(st.booleans()))
    else:
        relative = draw(st.booleans())
        kw.update(lr=lr / 10, beta1=draw(st.sampled_from([None, 0.9])),
                  momentum_of=draw(st.sampled_from(["scaled_update", "update"])),
                  eps1_placement=draw(st.sampled_from(["grad_sq", "clamp"])),
                  eps=draw(st.sampled_from([(1e-30, 1e-3), (None, 1e-3)])),
                  relative_step=relative, warmup_init=relative and draw(st.booleans()),
                  scale_parameter=draw(st.booleans()),
                  clip_threshold=draw(st.sampled_from([1.0, 0.5, math.inf])),
                  upcast=draw(st.booleans()), **_wd(draw))
        kw["decay_scale"] = draw(st.sampled_from(["lr", "alpha"])) \
            if kw["wd_mode"] == "decoupled" else "lr"
    return name, kw


CLASSES = {"sgd": optimlab.SGD, "adagrad": optimlab.AdaGrad, "rmsprop": optimlab.RMSProp,
           "adam": optimlab.Adam, "adamw": optimlab.AdamW, "amsgrad": optimlab.AMSGrad,
           "radam": optimlab.RAdam, "adafactor": optimlab.Adafactor}


@st.composite
def tensors(draw):
    """One parameter's (shape, dtype, layout, grad dtype, grad layout)."""
    shape = draw(st.sampled_from(SHAPES))
    # weighted toward what the fused kernels take, so that they run often; every odd case
    # stays in the space
    odd = ["sliced"] + (["transposed"] if len(shape) >= 2 else []) + \
        (["channels_last"] if len(shape) == 4 else [])
    dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.float64] * 2 + DTYPES[2:]))
    return dict(shape=shape, dtype=dtype,
                layout=draw(st.sampled_from(["contiguous"] * 4 + odd + ["expanded"])),
                grad_dtype=draw(st.sampled_from([dtype] * 4 + DTYPES)),
                grad_layout=draw(st.sampled_from(["contiguous"] * 4 + odd +
                                                 ["expanded", "neg_view"])))


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` in ``layout``: the same values and dtype, other strides."""
    if layout == "sliced":                       # a view into a larger buffer, every other row
        if values.dim() == 0:
            return values.clone()
        big = torch.zeros((values.shape[0] * 2,) + values.shape[1:], dtype=values.dtype)
        big[::2] = values
        return big[::2]
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":                     # stride 0 along the first dimension
        if values.dim() == 0 or values.shape[0] == 0:
            return values.clone()
        return values[:1].expand(values.shape)
    if layout == "neg_view":
        return torch._neg_view(-values)
    return values.clone()


def _build(specs, seed):
    """Parameters and a gradient function (one list per step) for ``specs``."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for sp in specs:
        v = torch.randn(sp["shape"], generator=g, dtype=torch.float64)
        p = torch.nn.Parameter(_laid_out(v.to(sp["dtype"]), sp["layout"]))
        p.grad_dtype = None
        params.append(p)
    bank = [[torch.randn(sp["shape"], generator=g, dtype=torch.float64) for sp in specs]
            for _ in range(STEPS + 1)]

    def grads(t):
        return [_laid_out(b.to(sp["grad_dtype"]), sp["grad_layout"])
                for b, sp in zip(bank[t], specs)]
    return params, grads


def _run(name, kw, specs, state_dtype, impl, seed):
    """Three steps under ``impl`` (after a reference warm-up step whose state is cast to
    ``state_dtype`` and loaded); returns (params, state, paths) or the exception."""
    params, grads = _build(specs, seed)
    cls = CLASSES[name]
    try:
        warm = cls(params, **copy.deepcopy(kw), impl="reference", nonfinite="ignore")
        for p, gr in zip(params, grads(0)):
            p.grad = gr
        warm.step()
        sd = warm.state_dict()
        if state_dtype is not None:
            for s in sd["state"].values():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor) and k != "step" and v.is_floating_point():
                        s[k] = v.to(state_dtype)
        opt = cls(params, **copy.deepcopy(kw), impl=impl, nonfinite="ignore")
        opt.load_state_dict(sd)
    except Exception as e:                         # a configuration no impl can run
        return ("setup", type(e), str(e))
    before = [p.detach().clone() for p in params]
    try:
        for t in range(1, STEPS + 1):
            for p, gr in zip(params, grads(t)):
                p.grad = gr
            opt.step()
    except Exception as e:
        return ("step", type(e), str(e), before, params)
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
              for k, v in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], state, opt.last_step_impls


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    a, b = a.double(), b.double()
    nan = torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan):
        return False
    a, b = a[~nan], b[~nan]
    inf = torch.isinf(b)
    if not torch.equal(a[inf], b[inf]):
        return False
    a, b = a[~inf], b[~inf]
    return bool(((a - b).abs() <= tol * b.abs().clamp(min=1.0)).all())


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, NaN where ``b`` has NaN (a warm-up step may leave NaN in the weights,
    and NaN != NaN)."""
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(a[~nan], b[~nan])


def check(name, kw, specs, state_dtype, impl, seed=0) -> str:
    """Assert the property for one example; returns what it came to (for the summary)."""
    ref = _run(name, kw, specs, state_dtype, "reference", seed)
    got = _run(name, kw, specs, state_dtype, impl, seed)
    if isinstance(ref, tuple) and ref and ref[0] == "setup":
        assert isinstance(got, tuple) and got[0] == "setup" and got[1] is ref[1], (ref, got)
        return "both rejected at construction"
    if isinstance(got, tuple) and got and got[0] == "step":
        _, etype, msg, before, params = got
        if impl == "fused" and "impl='fused'" in msg:       # a refusal, before any write
            assert all(_unchanged(p.detach(), b) for p, b in zip(params, before)), msg
            return "impl='fused' refused"
        assert isinstance(ref, tuple) and ref[0] == "step" and ref[1] is etype, \
            f"{impl} raised {etype.__name__}: {msg}; the reference " + (
                f"raised {ref[1].__name__}: {ref[2]}" if isinstance(ref, tuple) and
                ref[0] == "step" else "did not")
        return "both raised " + etype.__name__
    assert not (isinstance(ref, tuple) and ref and ref[0] == "step"), \
        f"the reference raised {ref[1].__name__}: {ref[2]}; {impl} did not"
    (pa, sa, paths), (pb, sb, _) = got, ref
    dtypes = {sp["dtype"] for sp in specs} | {sp["grad_dtype"] for sp in specs}
    dtypes |= {state_dtype, kw.get("state_dtype")} - {None}
    tol = max(TOL[d] for d in dtypes)
    if not {"fused-cpu", "torch-fused"} & set(paths) and \
            not dtypes & {torch.bfloat16, torch.float16}:
        tol = 0.0                         # the reference kernel (on TensorLists): exact on CPU
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert _close(a, b, tol), f"param {i} ({paths}): max diff {(a.double() - b.double()).abs().max()}"
    for i, (x, y) in enumerate(zip(sa, sb)):
        assert x.keys() == y.keys(), (i, x.keys(), y.keys())
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert _close(x[k], y[k], tol), f"state {i} {k!r} ({paths})"
            else:
                assert x[k] == y[k], (i, k, x[k], y[k])
    return "equal, ran " + "+".join(paths) + (" (exact)" if tol == 0 else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    outcomes: dict[str, int] = {}

    @settings(max_examples=args.examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(opt=optimizers(), specs=st.lists(tensors(), min_size=1, max_size=3),
           state_dtype=st.sampled_from([None, None, torch.float32, torch.float64,
                                        torch.bfloat16]),
           impl=st.sampled_from(["auto", "foreach", "fused"]))
    def prop(opt, specs, state_dtype, impl):
        name, kw = opt
        print(f"example: {name} {kw} {specs} state={state_dtype} impl={impl}", file=sys.stderr,
              flush=True)
        what = check(name, kw, specs, state_dtype, impl)
        outcomes[what] = outcomes.get(what, 0) + 1

    prop()
    print(f"ok: {sum(outcomes.values())} examples", flush=True)
    for what, n in sorted(outcomes.items(), key=lambda x: -x[1]):
        print(f"  {n:5d}  {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
