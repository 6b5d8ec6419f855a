"""SAM / ASAM and accumulate_and_step.

Identities and references, all float32 with max |dp| <= 1e-6 unless stated:
k micro-batches (unequal sizes) == their concatenation, for SGD and AdamW bases, perturbation
and update; seed 004's naive loop (second pass replays the last micro-batch) gives another
update; rho = 0 is the base optimizer bit for bit; SAM and ASAM perturbations against hand
computed values (float64, 1e-12); 2-process DDP (gloo, CPU) == 1 process on the global batch;
GradScaler (CPU, and CUDA when present) == the unscaled run, with skips that restore w;
state_dict resume == uninterrupted, bit for bit.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings

import pytest
import torch

import optimlab
from optimlab import SAM, accumulate_and_step
from tests.helpers import init_gloo, max_param_diff, run_workers

TOL = 1e-6
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


# ------------------------------------------------------------------ fixtures
def mlp(seed=0, bn=False, device="cpu"):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh(), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers).to(device)


def data(step, n=20, device="cpu"):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(n, 6, generator=g).to(device),
            torch.randint(0, 3, (n,), generator=g).to(device))


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def split(x, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    return out


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class RecordingSAM(SAM):
    """SAM that records each perturbation e = (w + e) - w."""

    def first_step(self, zero_grad=False):
        moved = super().first_step(zero_grad)
        if moved:
            self.perturbations = [p.detach() - w for p, w in self._saved_w.items()]
        return moved


BASES = {
    "torch.SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "optimlab.AdamW": (optimlab.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "torch.AdamW": (torch.optim.AdamW, dict(lr=1e-2)),
}


# ------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["noclip", "clip"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("base", list(BASES))
def test_micro_batches_equal_the_concatenated_batch(base, adaptive, max_grad_norm):
    cls, kw = BASES[base]
    runs = {}
    for name, sizes in [("micro", [5, 3, 8, 4]), ("concat", [20])]:
        model = mlp()
        opt = RecordingSAM(model.parameters(), cls, rho=0.5 if adaptive else 0.05,
                           adaptive=adaptive, **kw)
        es = []
        for t in range(3):
            x, y = data(t)
            accumulate_and_step(model, opt, split(x, y, sizes), loss_fn,
                                max_grad_norm=max_grad_norm)
            es.append(opt.perturbations)
        runs[name] = (params(model), es)
    (pa, ea), (pb, eb) = runs["micro"], runs["concat"]
    assert max(max_param_diff(a, b) for a, b in zip(ea, eb)) <= TOL       # same perturbation
    assert max_param_diff(pa, pb) <= TOL                                  # same update
    assert max_param_diff(pa, params(mlp())) > 1e-3                       # and it trained


def test_seed_004_naive_loop_gives_another_update():
    """Seed 004's loop: the second pass recomputes the *last* micro-batch k times."""
    k, sizes = 4, [5, 5, 5, 5]
    x, y = data(0)
    batches = split(x, y, sizes)

    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for b in batches:                                # first pass: all micro-batches (correct)
        (loss_fn(model, b) / k).backward()
    opt.first_step(zero_grad=True)
    for _ in range(k):                               # the bug: `input` is the last micro-batch
        (loss_fn(model, batches[-1]) / k).backward()
    opt.second_step(zero_grad=True)
    naive = params(model)

    fixed, concat = mlp(), mlp()
    for m, bs in [(fixed, batches), (concat, [(x, y)])]:
        accumulate_and_step(m, SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), bs,
                            loss_fn)
    assert max_param_diff(params(fixed), params(concat)) <= TOL
    assert max_param_diff(naive, params(concat)) > 1e-3


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["noclip", "clip"])
def test_plain_optimizer_uses_the_same_call(max_grad_norm):
    """accumulate_and_step with AdamW == zero_grad, backward on the whole batch, clip, step."""
    a, b = mlp(), mlp()
    oa = optimlab.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    ob = optimlab.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for t in range(3):
        x, y = data(t)
        loss = accumulate_and_step(a, oa, split(x, y, [7, 1, 12]), loss_fn,
                                   max_grad_norm=max_grad_norm)
        ob.zero_grad()
        ref = loss_fn(b, (x, y))
        ref.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(b.parameters(), max_grad_norm)
        ob.step()
        assert abs(loss - ref.item()) <= TOL
    assert max_param_diff(params(a), params(b)) <= TOL


def test_helper_matches_the_two_call_form_with_clipping():
    """The documented clipping point: the second-pass gradient, right before second_step."""
    a, b = mlp(), mlp()
    oa = SAM(a.parameters(), optimlab.AdamW, lr=1e-2)
    ob = SAM(b.parameters(), optimlab.AdamW, lr=1e-2)
    for t in range(3):
        x, y = data(t)
        accumulate_and_step(a, oa, split(x, y, [10, 10]), loss_fn, max_grad_norm=0.05)
        loss_fn(b, (x, y)).backward()
        ob.first_step(zero_grad=True)
        loss_fn(b, (x, y)).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        ob.second_step(zero_grad=True)
    assert max_param_diff(params(a), params(b)) <= TOL


def test_micro_batch_sizes_are_inferred_or_given():
    x, y = data(0)
    a, b = mlp(), mlp()
    oa = SAM(a.parameters(), torch.optim.SGD, lr=0.1)
    ob = SAM(b.parameters(), torch.optim.SGD, lr=0.1)
    dict_batches = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]
    accumulate_and_step(a, oa, dict_batches, lambda m, d: loss_fn(m, (d["x"], d["y"])))
    accumulate_and_step(b, ob, split(x, y, [4, 16]), loss_fn, sizes=[4, 16])
    assert max_param_diff(params(a), params(b)) <= TOL
    with pytest.raises(ValueError, match="sizes"):
        accumulate_and_step(b, ob, split(x, y, [4, 16]), loss_fn, sizes=[4])
    with pytest.raises(TypeError, match="sizes"):
        accumulate_and_step(b, ob, ["a", "b"], loss_fn)
    with pytest.raises(ValueError, match="empty"):
        accumulate_and_step(b, ob, [], loss_fn)
    with pytest.raises(ValueError, match="max_grad_norm"):
        accumulate_and_step(b, ob, [(x, y)], loss_fn, max_grad_norm=0.0)


def test_second_pass_keeps_batchnorm_statistics_from_the_first():
    x, y = data(0)
    batches = split(x, y, [10, 10])
    ref = mlp(bn=True)
    with torch.no_grad():                            # stats after one pass at w
        for b in batches:
            ref(b[0])
    bn_ref = ref[1]
    for keep, same in [(False, True), (True, False)]:
        model = mlp(bn=True)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
        accumulate_and_step(model, opt, batches, loss_fn, second_pass_updates_bn=keep)
        bn = model[1]
        assert torch.equal(bn.running_mean, bn_ref.running_mean) == same
        assert int(bn.num_batches_tracked) == (2 if same else 4)


# ------------------------------------------------------------------ identities and formulas
@pytest.mark.parametrize("form", ["closure", "two_call", "helper"])
@pytest.mark.parametrize("base", list(BASES))
def test_rho_zero_is_the_base_optimizer_exactly(base, form):
    cls, kw = BASES[base]
    a, b = mlp(), mlp()
    sam = SAM(a.parameters(), cls, rho=0.0, **kw)
    ref = cls(b.parameters(), **kw)
    for t in range(4):
        x, y = data(t)
        if form == "closure":
            def closure():
                sam.zero_grad()
                loss = loss_fn(a, (x, y))
                loss.backward()
                return loss
            sam.step(closure)
        elif form == "two_call":
            loss_fn(a, (x, y)).backward()
            sam.first_step(zero_grad=True)
            loss_fn(a, (x, y)).backward()
            sam.second_step(zero_grad=True)
        else:
            accumulate_and_step(a, sam, [(x, y)], loss_fn)
        ref.zero_grad()
        loss_fn(b, (x, y)).backward()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _first_step_on(ws, gs, groups_kw=None, **kw):
    ps = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in ws]
    groups = [{"params": [p], **(groups_kw[i] if groups_kw else {})} for i, p in enumerate(ps)]
    opt = SAM(groups, torch.optim.SGD, lr=0.1, **kw)
    for p, g in zip(ps, gs):
        p.grad = torch.tensor(g, dtype=torch.float64)
    assert opt.first_step()
    return [(p.detach() - torch.tensor(w, dtype=torch.float64)).tolist() for p, w in zip(ps, ws)]


def test_sam_perturbation_is_rho_g_over_the_global_norm_with_per_group_rho():
    # ||g|| over both groups = ||(3, 0, 4)|| = 5; group 0 has rho 0.5, group 1 rho 1.0
    e = _first_step_on([[1.0, 2.0], [5.0]], [[3.0, 0.0], [4.0]], [{"rho": 0.5}, {"rho": 1.0}])
    assert e[0] == pytest.approx([0.3, 0.0], abs=1e-12)
    assert e[1] == pytest.approx([0.8], abs=1e-12)


def test_asam_perturbation_matches_the_formula():
    # eta = 0: T = (1, 2), T g = (0.5, 0.5), ||T g|| = sqrt(0.5), T^2 g = (0.5, 1.0)
    e = _first_step_on([[1.0, -2.0]], [[0.5, 0.25]], rho=0.5, adaptive=True, eta=0.0)
    assert e[0] == pytest.approx([0.25 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)], abs=1e-12)
    # Kwon et al.'s eta = 0.01 (the default): T = |w| + 0.01 = (1.01, 2.01)
    e = _first_step_on([[1.0, -2.0]], [[0.5, 0.25]], rho=0.5, adaptive=True)
    norm = math.hypot(1.01 * 0.5, 2.01 * 0.25)
    assert e[0] == pytest.approx([0.5 * 1.01 ** 2 * 0.5 / norm, 0.5 * 2.01 ** 2 * 0.25 / norm],
                                 abs=1e-12)
    # an adaptive group and a plain one (SamsungLabs/ASAM's T = 1 for biases) share one norm
    e = _first_step_on([[2.0], [7.0]], [[1.0], [1.0]], [{"adaptive": True}, {"adaptive": False}],
                       rho=1.0, eta=0.0)
    assert e[0] + e[1] == pytest.approx([4.0 / math.sqrt(5.0), 1.0 / math.sqrt(5.0)], abs=1e-12)


def test_zero_gradient_means_no_perturbation():
    e = _first_step_on([[1.0, 2.0]], [[0.0, 0.0]], rho=0.05)
    assert e == [[0.0, 0.0]]


# ------------------------------------------------------------------ optimizer protocol
def test_param_groups_and_state_are_the_base_optimizers():
    model = mlp()
    sam = SAM(model.parameters(), optimlab.AdamW, rho=0.1, lr=1e-3)
    assert sam.param_groups is sam.base_optimizer.param_groups
    assert sam.param_groups[0]["rho"] == 0.1 and sam.param_groups[0]["lr"] == 1e-3
    extra = torch.zeros(2, requires_grad=True)
    sam.add_param_group({"params": [extra], "lr": 0.5, "rho": 0.2})
    assert len(sam.base_optimizer.param_groups) == 2
    g = sam.param_groups[1]
    assert (g["rho"], g["adaptive"], g["lr"], g["initial_lr"]) == (0.2, False, 0.5, 0.5)
    x, y = data(0)
    accumulate_and_step(model, sam, [(x, y)], loss_fn)
    p0 = next(model.parameters())
    assert sam.state[p0] is sam.base_optimizer.state[p0] and "exp_avg" in sam.state[p0]
    clone = copy.deepcopy(sam)
    assert clone.param_groups is clone.base_optimizer.param_groups


@pytest.mark.parametrize("on", ["sam", "base"])
@pytest.mark.parametrize("form", ["closure", "two_call"])
def test_lr_schedulers_drive_the_base_lr(on, form):
    model = mlp()
    sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(sam if on == "sam" else sam.base_optimizer,
                                              lambda s: 0.5 ** s)
    x, y = data(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no "scheduler before optimizer" warning
        for _ in range(2):
            if form == "closure":
                def closure():
                    sam.zero_grad()
                    loss = loss_fn(model, (x, y))
                    loss.backward()
                    return loss
                sam.step(closure)
            else:
                loss_fn(model, (x, y)).backward()
                sam.first_step(zero_grad=True)
                loss_fn(model, (x, y)).backward()
                sam.second_step(zero_grad=True)
            sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3, abs=1e-15)
    assert sam.param_groups[0]["initial_lr"] == 1e-2


def _train(model, opt, steps, seed):
    for t in range(steps):
        x, y = data(seed * 100 + t)
        accumulate_and_step(model, opt, split(x, y, [12, 8]), loss_fn)


def test_state_dict_resume_is_bit_identical():
    model = mlp()
    sam = SAM(model.parameters(), optimlab.AdamW, rho=0.1, adaptive=True, lr=1e-2,
              weight_decay=0.1)
    _train(model, sam, 3, seed=1)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(sam.state_dict())
    assert set(saved_opt) == {"base_optimizer", "sam"}
    moments = saved_opt["base_optimizer"]["state"][0]
    assert set(moments) == {"step", "exp_avg", "exp_avg_sq"} and moments["step"] == 3
    assert saved_opt["base_optimizer"]["param_groups"][0]["rho"] == 0.1
    _train(model, sam, 3, seed=2)

    model2 = mlp(seed=7)
    model2.load_state_dict(saved_model)
    sam2 = SAM(model2.parameters(), optimlab.AdamW, rho=0.9, lr=1.0)   # overwritten by the load
    sam2.load_state_dict(saved_opt)
    assert sam2.param_groups[0]["rho"] == 0.1 and sam2.param_groups[0]["lr"] == 1e-2
    assert sam2.param_groups is sam2.base_optimizer.param_groups
    _train(model2, sam2, 3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_a_plain_base_checkpoint_turns_sam_on():
    model = mlp()
    adamw = optimlab.AdamW(model.parameters(), lr=1e-2)
    _train(model, adamw, 2, seed=1)
    sam = SAM(model.parameters(), optimlab.AdamW, rho=0.07, lr=1.0)
    sam.load_state_dict(roundtrip(adamw.state_dict()))
    assert sam.param_groups[0]["rho"] == 0.07 and sam.param_groups[0]["lr"] == 1e-2
    assert sam.state[next(model.parameters())]["step"] == 2
    _train(model, sam, 1, seed=2)
    assert sam.state[next(model.parameters())]["step"] == 3


def test_no_checkpoint_between_the_two_steps():
    model = mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(0)
    loss_fn(model, (x, y)).backward()
    w = params(model)
    sam.first_step(zero_grad=True)
    assert sam.perturbed
    with pytest.raises(RuntimeError, match="between first_step"):
        sam.state_dict()
    with pytest.raises(RuntimeError, match="called twice"):
        sam.first_step()
    sam.restore()                                   # undo the perturbation, no step
    assert not sam.perturbed and max_param_diff(w, params(model)) == 0.0
    sam.state_dict()


# ------------------------------------------------------------------ non-finite gradients
def _poisoned(model, at_call, value=float("inf")):
    calls = []

    def fn(m, batch):
        loss = loss_fn(m, batch)
        calls.append(len(calls))
        return loss * value if len(calls) - 1 == at_call else loss
    return fn, calls


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_nonfinite_pass_skips_the_update_and_restores_w(bad_pass):
    model = mlp()
    sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
    _train(model, sam, 2, seed=1)
    w, before = params(model), roundtrip(sam.state_dict())
    fn, calls = _poisoned(model, at_call=0 if bad_pass == 1 else 2)
    x, y = data(0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        accumulate_and_step(model, sam, split(x, y, [10, 10]), fn)
    assert len(calls) == (2 if bad_pass == 1 else 4)   # no second pass after a bad first one
    assert sam.skipped_steps == 1 and not sam.perturbed
    assert max_param_diff(w, params(model)) == 0.0
    after = sam.state_dict()["base_optimizer"]["state"]
    for pid, s in before["base_optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[pid][k]))


def test_gradients_are_checked_once_per_update(monkeypatch):
    """SAM checks the second-pass gradient and tells an optimlab base optimizer so
    (``step(grad_norm=)``): one read to check per update in the two-call form, none where the
    clip's norm proves them finite; a non-finite clip norm still skips the update."""
    import optimlab._common as common
    import optimlab.sam as sam_module
    reads = []
    real = common.all_finite

    def counting(ts):
        reads.append(len(ts))
        return real(ts)
    monkeypatch.setattr(common, "all_finite", counting)
    monkeypatch.setattr(sam_module, "all_finite", counting)
    model = mlp()
    sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
    x, y = data(0)
    loss_fn(model, (x, y)).backward()
    sam.first_step(zero_grad=True)
    loss_fn(model, (x, y)).backward()
    assert sam.second_step(zero_grad=True) and len(reads) == 1
    reads.clear()
    accumulate_and_step(model, sam, split(x, y, [10, 10]), loss_fn, max_grad_norm=1.0)
    assert reads == [] and sam.skipped_steps == 0
    w = params(model)
    fn, calls = _poisoned(model, at_call=2)
    with pytest.warns(RuntimeWarning, match="second-pass"):
        accumulate_and_step(model, sam, split(x, y, [10, 10]), fn, max_grad_norm=1.0)
    assert sam.skipped_steps == 1 and max_param_diff(w, params(model)) == 0.0


def test_nonfinite_closure_is_called_once_and_raise_restores_w():
    model = mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(0)
    calls = []

    def closure():
        calls.append(1)
        sam.zero_grad()
        loss = loss_fn(model, (x, y)) * (float("nan") if len(calls) == 1 else 1.0)
        loss.backward()
        return loss
    w = params(model)
    with pytest.warns(RuntimeWarning, match="first-pass gradient norm"):
        sam.step(closure)
    assert len(calls) == 1 and max_param_diff(w, params(model)) == 0.0
    strict = SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="raise")
    loss_fn(model, (x, y)).backward()
    strict.first_step(zero_grad=True)
    (loss_fn(model, (x, y)) * float("inf")).backward()
    with pytest.raises(FloatingPointError, match="second-pass"):
        strict.second_step()
    assert not strict.perturbed and max_param_diff(w, params(model)) == 0.0


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_equals_the_unscaled_run(device):
    runs = []
    for use_scaler in (False, True):
        model = mlp(device=device)
        sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=2) \
            if use_scaler else None
        for t in range(4):
            x, y = data(t, device=device)
            accumulate_and_step(model, sam, split(x, y, [6, 14]), loss_fn, scaler=scaler,
                                max_grad_norm=1.0)
        runs.append(params(model))
    assert max_param_diff(*runs) <= TOL
    assert scaler.get_scale() == 2.0 ** 12          # 4 clean updates, growth every 2: one
                                                    # update() per SAM step, not per pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_grad_scaler_skip_restores_w_and_backs_off(device, bad_pass):
    model = mlp(device=device)
    sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    x, y = data(0, device=device)
    accumulate_and_step(model, sam, split(x, y, [10, 10]), loss_fn, scaler=scaler)
    w, state = params(model), roundtrip(sam.state_dict())
    fn, calls = _poisoned(model, at_call=1 if bad_pass == 1 else 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # the scaler's skips are quiet
        accumulate_and_step(model, sam, split(x, y, [10, 10]), fn, scaler=scaler)
    assert len(calls) == (2 if bad_pass == 1 else 4)
    assert max_param_diff(w, params(model)) == 0.0 and not sam.perturbed
    assert sam.state_dict()["base_optimizer"]["state"][0]["step"] == \
        state["base_optimizer"]["state"][0]["step"] == 1
    assert scaler.get_scale() == 2.0 ** 9 and sam.skipped_steps == 0
    accumulate_and_step(model, sam, split(x, y, [10, 10]), loss_fn, scaler=scaler)
    assert max_param_diff(w, params(model)) > 0.0   # and it goes on


def test_plain_optimizer_with_grad_scaler():
    a, b = mlp(), mlp()
    oa = optimlab.AdamW(a.parameters(), lr=1e-2)
    ob = optimlab.AdamW(b.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for t in range(3):
        x, y = data(t)
        accumulate_and_step(a, oa, split(x, y, [5, 15]), loss_fn, scaler=scaler,
                            max_grad_norm=0.5)
        accumulate_and_step(b, ob, split(x, y, [5, 15]), loss_fn, max_grad_norm=0.5)
    assert max_param_diff(params(a), params(b)) <= TOL


def test_bf16_autocast_on_cpu():
    """Forward and loss under autocast(cpu, bf16): parameters and gradients stay fp32 and
    the run tracks the fp32 run to bf16 accuracy (1e-2 after 3 steps)."""
    runs = []
    for autocast in (None, torch.bfloat16):
        model = mlp()
        sam = SAM(model.parameters(), optimlab.AdamW, lr=1e-2)
        for t in range(3):
            x, y = data(t)
            loss = accumulate_and_step(model, sam, split(x, y, [8, 12]), loss_fn,
                                       autocast=autocast)
            assert math.isfinite(loss)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in model.parameters())
        runs.append(params(model))
    assert 0.0 < max_param_diff(*runs) <= 1e-2


# ------------------------------------------------------------------ bad input
def test_bad_arguments_are_clear_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="rho"):
        SAM(p, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(p, torch.optim.SGD, rho=float("nan"), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": p, "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        SAM(p, torch.optim.SGD, adaptive=True, eta=-0.01, lr=0.1)
    with pytest.raises(ValueError, match="perturbation"):
        SAM(p, torch.optim.SGD, perturbation="replica", lr=0.1)
    with pytest.raises(ValueError, match="nonfinite"):
        SAM(p, torch.optim.SGD, nonfinite="zero", lr=0.1)
    with pytest.raises(TypeError, match="optimizer class.*instance of SGD|instance of SGD"):
        SAM(p, torch.optim.SGD(p, lr=0.1))
    with pytest.raises(TypeError, match="optimizer class"):
        SAM(p, "adamw")
    with pytest.raises(TypeError, match="optimizer class"):
        SAM(p, torch.nn.Linear)
    with pytest.raises(TypeError, match="SAM cannot wrap SAM"):
        SAM(p, SAM)
    with pytest.raises(ValueError, match="lr"):                    # the base's own check
        SAM(p, optimlab.AdamW, lr=-1.0)
    sam = SAM(p, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    with pytest.raises(ValueError, match="rho"):
        sam.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "rho": -2.0})
    with pytest.raises(ValueError, match="not a SAM state_dict"):
        sam.load_state_dict({"foo": 1})


# ------------------------------------------------------------------ DDP (2 gloo processes)
DDP_SIZES = [[5, 3], [6]]          # rank 0: two micro-batches (8 examples); rank 1: one (6)
DDP_STEPS, DDP_RHO, DDP_CLIP = 3, 0.1, 0.2   # the gradient norm is ~0.5: clipping is active


def _ddp_opt(params, perturbation="global"):
    return SAM(params, optimlab.AdamW, rho=DDP_RHO, perturbation=perturbation, lr=1e-2,
               weight_decay=0.1)


def _ddp_worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    dist = torch.distributed
    try:
        results = {}
        for mode in ("global", "local"):
            model = mlp()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = _ddp_opt(ddp.parameters(), mode)
            for t in range(DDP_STEPS):
                x, y = data(t, n=14)
                lo = sum(sum(s) for s in DDP_SIZES[:rank])
                mine = split(x[lo:], y[lo:], DDP_SIZES[rank])
                accumulate_and_step(ddp, opt, mine, loss_fn, max_grad_norm=DDP_CLIP)
            results[mode] = params(model)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()          # no rank tears gloo down while its peer is still talking
    finally:
        dist.destroy_process_group()


def _local_reference():
    """perturbation="local" written out: each replica r perturbs with its own gradient g_r,
    takes the gradient of its shard at w + e_r; DDP averages (weight n_r / N); base step."""
    model = mlp()
    base = optimlab.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ps = list(model.parameters())
    for t in range(DDP_STEPS):
        x, y = data(t, n=14)
        shards = split(x, y, [sum(s) for s in DDP_SIZES])
        w = params(model)
        total = [torch.zeros_like(p) for p in ps]
        for xs, ys in shards:
            g = torch.autograd.grad(loss_fn(model, (xs, ys)), ps)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g]))
            with torch.no_grad():
                for p, v in zip(ps, g):
                    p.add_(DDP_RHO * v / norm)
            h = torch.autograd.grad(loss_fn(model, (xs, ys)), ps)
            with torch.no_grad():
                for acc, v in zip(total, h):
                    acc.add_(v, alpha=len(xs) / len(x))
                for p, v in zip(ps, w):
                    p.copy_(v)
        for p, v in zip(ps, total):
            p.grad = v
        torch.nn.utils.clip_grad_norm_(ps, DDP_CLIP)
        base.step()
    return params(model)


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    run_workers(_ddp_worker, 2, tmp_path, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    single = mlp()                   # one process, the 14-example global batch
    opt = _ddp_opt(single.parameters())
    for t in range(DDP_STEPS):
        x, y = data(t, n=14)
        accumulate_and_step(single, opt, [(x, y)], loss_fn, max_grad_norm=DDP_CLIP)
    assert max_param_diff(r0["global"], params(single)) <= TOL
    assert max_param_diff(r1["global"], params(single)) <= TOL
    # local perturbation: replicas stay identical and match the written-out algorithm
    assert max_param_diff(r0["local"], r1["local"]) == 0.0
    assert max_param_diff(r0["local"], _local_reference()) <= TOL
    assert max_param_diff(r0["local"], r0["global"]) > 1e-5
