"""DTensor parameters (issue 12): every optimizer and SAM on FSDP2 (``fully_shard``) and on
DTensors of every placement (Shard(0) as FSDP2 lays them out, Shard(1) and Shard(2) as tensor
parallelism does, Replicate), uneven shards and empty ones included, equal a one-process run
on the whole tensors; a non-finite gradient in one rank's shard makes every rank skip;
distributed checkpoints (torch.distributed.checkpoint) save on 2 ranks and load on 1 and on 2.

Tolerance: 2 ranks differ from 1 process only in the order of summation (the all-reduced
gradient and the all-reduced Adafactor statistics and RMS values): 1e-6, absolute for values
up to 1 and relative above (float32), as the fast-path tests state it."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import optimlab as A
from tests.helpers import init_gloo, run_workers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(), reason="needs gloo")
TOL = 1e-6

# each optimizer with its defaults, and the options that change what spans shards
CONFIGS = [
    ("sgd", lambda p: A.SGD(p, lr=0.1)),
    ("sgd-momentum-wd", lambda p: A.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                        weight_decay=0.1)),
    ("adagrad", lambda p: A.AdaGrad(p)),
    ("rmsprop", lambda p: A.RMSProp(p, momentum=0.9, centered=True)),
    ("adam", lambda p: A.Adam(p)),
    ("adamw", lambda p: A.AdamW(p, weight_decay=0.1)),
    ("amsgrad", lambda p: A.AMSGrad(p)),
    ("radam", lambda p: A.RAdam(p)),
    ("adafactor", lambda p: A.Adafactor(p)),
    ("adafactor-momentum-wd", lambda p: A.Adafactor(p, beta1=0.9, weight_decay=0.1,
                                                    decay_scale="alpha")),
    ("adafactor-torch", lambda p: A.Adafactor(p, eps=(None, 1e-3), eps1_placement="clamp",
                                              clip_threshold=2.0)),
]

# (global shape, placement) pairs: 1-D, 2-D, 3-D; dimensions not divisible by 2; a 1 x n
# matrix whose second rank holds an empty shard
LAYOUTS = [((7,), "S0"), ((7, 5), "S0"), ((5, 7), "S1"), ((3, 5, 4), "S0"), ((3, 5, 4), "S1"),
           ((3, 5, 4), "S2"), ((1, 3), "S0"), ((4, 6), "R"),
           # on a 2-D mesh of 1 x 2 ranks (as HSDP and FSDP + tensor parallel lay them out):
           # one placement per mesh dimension
           ((5, 6), "R,S0"), ((5, 3, 4), "S1,S2"), ((3, 5), "S0,S1")]


def _scaled(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() if a.numel() else 0.0


def _placements(code: str) -> list:
    from torch.distributed.tensor import Replicate, Shard
    return [Replicate() if c == "R" else Shard(int(c[1:])) for c in code.split(",")]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------ the workers
def _placements_scenario(rank, world) -> dict:
    """Each config on DTensors of every layout vs the same config on plain tensors, fed the
    same gradients (noise + 0.5 theta), 6 steps, on each rank."""
    from torch.distributed.tensor import distribute_tensor, init_device_mesh
    meshes = {1: init_device_mesh("cpu", (world,)), 2: init_device_mesh("cpu", (1, world))}

    def dist(t, code):
        pls = _placements(code)
        return distribute_tensor(t, meshes[len(pls)], pls)
    out = {}
    for name, make in CONFIGS:
        gen = torch.Generator().manual_seed(0)
        fulls = [torch.randn(shape, generator=gen) for shape, _ in LAYOUTS]
        plain = [nn.Parameter(f.clone()) for f in fulls]
        shard = [nn.Parameter(dist(f.clone(), pl)) for f, (_, pl) in zip(fulls, LAYOUTS)]
        oa, ob = make(plain), make(shard)
        for _ in range(6):
            for a, b, (_, pl) in zip(plain, shard, LAYOUTS):
                g = torch.randn(a.shape, generator=gen) + 0.5 * a.detach()
                a.grad = g
                b.grad = dist(g.clone(), pl)
            oa.step()
            ob.step()
        worst = max(_scaled(_full(b), a) for a, b in zip(plain, shard))
        for a, b in zip(plain, shard):
            for k, v in oa.state[a].items():
                w = ob.state[b][k]
                if isinstance(v, torch.Tensor):
                    assert type(w).__name__ == "DTensor", (name, k)
                    worst = max(worst, _scaled(w.full_tensor(), v))
                else:
                    assert v == w, (name, k)
        out[name] = (worst, ob.last_step_impls)
    # a Partial parameter (summands, not values) is refused, naming the placement
    from torch.distributed.tensor import DTensor, Partial
    p = nn.Parameter(DTensor.from_local(torch.ones(3), meshes[1], [Partial()]))
    p.grad = DTensor.from_local(torch.ones(3), meshes[1], [Partial()])
    try:
        A.AdamW([p]).step()
        out["partial"] = None
    except ValueError as e:
        out["partial"] = str(e)
    return out


class _Model(nn.Module):
    """Linear(5, 7), a 3 x 5 x 4 tensor (3-D, uneven on dim 0), Linear(7, 3) and a 1 x 3 matrix
    (the second rank's shard is empty): FSDP2 shards every parameter on dim 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 7)
        self.t = nn.Parameter(torch.randn(3, 5, 4) * 0.3)
        self.b = nn.Linear(7, 3)
        self.c = nn.Parameter(torch.randn(1, 3))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.einsum("ni,kij->nj", x, self.t).sum(-1, keepdim=True)
        return self.b(h) * self.c


def _batch(t: int) -> torch.Tensor:
    return torch.linspace(-1, 1, 8 * 5).reshape(8, 5) * (1 + 0.25 * t)


def _loss(model, x):
    return model(x).square().mean()


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard
    model = _Model()
    fully_shard(model.a)
    fully_shard(model)
    return model


def _train(model, opt, ts, part=None):
    for t in ts:
        x = _batch(t)
        if part is not None:
            x = x[part * 4:(part + 1) * 4]                  # this rank's half
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()


def _fsdp_scenario(rank, world) -> dict:
    """Each config (and SAM/ASAM around AdamW) on the FSDP2 model with 2 ranks, half the batch
    each, vs one unsharded model on the whole batch, computed on each rank."""
    out = {}
    sams = [("sam", lambda p: A.SAM(p, A.AdamW, rho=0.05, lr=1e-2)),
            ("asam", lambda p: A.SAM(p, A.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9))]
    for name, make in CONFIGS + sams:
        model, ref = _fsdp_model(), _Model()
        opt, ropt = make(model.parameters()), make(ref.parameters())
        if name in ("sam", "asam"):
            for t in range(3):
                for m, o, x in ((model, opt, _batch(t)[rank * 4:(rank + 1) * 4]),
                                (ref, ropt, _batch(t))):
                    _loss(m, x).backward()
                    o.first_step(zero_grad=True)
                    _loss(m, x).backward()
                    o.second_step(zero_grad=True)
        else:
            _train(model, opt, range(3), part=rank)
            _train(ref, ropt, range(3))
        out[name] = max(_scaled(p.full_tensor(), q) for p, q in
                        zip(model.parameters(), ref.parameters()))
    return out


def _accumulate_scenario(rank, world) -> dict:
    """`accumulate_and_step` on the FSDP2 model with shares of the batch that differ between
    the ranks (5 and 3 of 8 examples, in 2 micro-batches each; FSDP2 averages over the ranks, so
    the helper must weight by the global count), clipping on, vs one process on the whole
    batch; and SAM's local perturbation, which FSDP2 cannot give, refused."""
    out = {}
    mine = [0, 1, 2, 3, 4] if rank == 0 else [5, 6, 7]
    makes = [("adamw", lambda p: A.AdamW(p, lr=1e-2, weight_decay=0.1)),
             ("sam", lambda p: A.SAM(p, A.AdamW, rho=0.05, lr=1e-2)),
             ("asam", lambda p: A.SAM(p, A.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9))]
    for name, make in makes:
        model, ref = _fsdp_model(), _Model()
        opt, ropt = make(model.parameters()), make(ref.parameters())
        for t in range(3):
            x = _batch(t)
            micro = [x[mine[:len(mine) // 2 + 1]], x[mine[len(mine) // 2 + 1:]]]
            A.accumulate_and_step(model, opt, micro, _loss, max_grad_norm=0.5)
            A.accumulate_and_step(ref, ropt, [x], _loss, max_grad_norm=0.5)
        out[name] = max(_scaled(p.full_tensor(), q) for p, q in
                        zip(model.parameters(), ref.parameters()))
    model = _fsdp_model()
    try:
        A.accumulate_and_step(model, A.SAM(model.parameters(), A.SGD, perturbation="local",
                                           lr=0.1), [_batch(0)[rank * 4:(rank + 1) * 4]], _loss)
        out["local"] = None
    except ValueError as e:
        out["local"] = str(e)
    return out


def _nonfinite_scenario(rank, world) -> dict:
    """A NaN in rank 1's shard of one gradient: every rank skips; parameters and state are
    bit-identical to before the step on every rank."""
    out = {}
    for name, make in CONFIGS:
        model = _fsdp_model()
        opt = make(model.parameters())
        _train(model, opt, range(2), part=rank)
        before = ([p.to_local().clone() for p in model.parameters()],
                  [{k: (v.to_local().clone() if isinstance(v, torch.Tensor) else v)
                    for k, v in opt.state[p].items()} for p in model.parameters()])
        _loss(model, _batch(2)[rank * 4:(rank + 1) * 4]).backward()
        if rank == 1:
            model.a.weight.grad.to_local()[0, 1] = float("nan")
        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step()
        same = all(torch.equal(p.to_local(), q) for p, q in zip(model.parameters(), before[0]))
        for p, st in zip(model.parameters(), before[1]):
            for k, v in st.items():
                now = opt.state[p][k]
                same &= torch.equal(now.to_local(), v) if isinstance(v, torch.Tensor) \
                    else now == v
        out[name] = (same, opt.skipped_steps)
    return out


def _dcp_scenario(rank, world, out_dir) -> dict:
    """Save model and optimizer with torch.distributed.checkpoint after 3 steps, run 2 more
    (the uninterrupted run); a fresh model and optimizer on 2 ranks load the checkpoint and
    run the same 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    out = {}
    for name, make in CONFIGS:
        model = _fsdp_model()
        opt = make(model.parameters())
        _train(model, opt, range(3), part=rank)
        path = os.path.join(out_dir, f"dcp-{name}")
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        _train(model, opt, range(3, 5), part=rank)
        final = [p.full_tensor() for p in model.parameters()]

        model2 = _fsdp_model()
        opt2 = make(model2.parameters())
        state = {"model": get_model_state_dict(model2),
                 "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        _train(model2, opt2, range(3, 5), part=rank)
        out[name] = (all(torch.equal(p.full_tensor(), q)
                         for p, q in zip(model2.parameters(), final)), final)
    return out


ZERO = [(A.SGD, dict(lr=0.1, momentum=0.9)), (A.AdaGrad, {}), (A.RMSProp, {}), (A.Adam, {}),
        (A.AdamW, dict(weight_decay=0.1)), (A.AMSGrad, {}), (A.RAdam, {}), (A.Adafactor, {})]


def _zero_scenario(rank, world) -> dict:
    """ZeRO-1 for DDP users: ``ZeroRedundancyOptimizer(params, optimizer_class=optimlab.X)``
    (each rank keeps the state of its part of the parameters) on 2 ranks vs the optimizer on
    one process and the whole batch; the consolidated state dict is kept for the test."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for cls, kw in ZERO:
        model, ref = _Model(), _Model()
        ddp = DDP(model)
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, **kw)
        _train(ddp, opt, range(3), part=rank)
        _train(ref, cls(ref.parameters(), **kw), range(3))
        worst = max(_scaled(p, q) for p, q in zip(model.parameters(), ref.parameters()))
        opt.consolidate_state_dict(to=0)
        # (a copy: the consolidated dict holds this rank's live state tensors)
        saved = (copy.deepcopy(opt.state_dict()) if rank == 0 else None,
                 [p.detach().clone() for p in model.parameters()])
        _train(ddp, opt, range(3, 4), part=rank)
        out[cls.__name__] = (worst, *saved, [p.detach().clone() for p in model.parameters()])
    return out


def _worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    try:
        import warnings
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        results = {"placements": _placements_scenario(rank, world),
                   "fsdp": _fsdp_scenario(rank, world),
                   "accumulate": _accumulate_scenario(rank, world),
                   "nonfinite": _nonfinite_scenario(rank, world),
                   "dcp": _dcp_scenario(rank, world, out_dir),
                   "zero": _zero_scenario(rank, world)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_workers(_worker, 2, out, timeout=300)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


NAMES = [n for n, _ in CONFIGS]


@pytest.mark.parametrize("name", NAMES)
def test_every_placement_equals_the_whole_tensors(sharded, name):
    """DTensors sharded on dim 0, 1 or 2, replicated, uneven and empty shards, on a 1-D and a
    2-D mesh (two meshes in one optimizer): parameters and
    state (DTensors with the parameter's placement, or the factored statistics' derived one)
    equal the optimizer on the whole tensors, on both ranks; the element-wise optimizers run
    their fused kernels on the local shards."""
    for r in sharded[1]:
        worst, impls = r["placements"][name]
        assert worst <= TOL, (name, worst)
        if not name.startswith("adafactor"):
            assert "fused-cpu" in impls or not A._ext.available(), (name, impls)


def test_a_partial_parameter_is_refused(sharded):
    for r in sharded[1]:
        assert "Partial placement" in (r["placements"]["partial"] or ""), r["placements"]["partial"]


@pytest.mark.parametrize("name", NAMES + ["sam", "asam"])
def test_fsdp2_two_ranks_equal_one_process(sharded, name):
    """The FSDP2 model on 2 ranks (half the batch each) equals one unsharded model on the
    whole batch: every optimizer with its defaults and fast paths, SAM and ASAM."""
    for r in sharded[1]:
        assert r["fsdp"][name] <= TOL, (name, r["fsdp"][name])


@pytest.mark.parametrize("name", ["adamw", "sam", "asam"])
def test_accumulate_and_step_on_fsdp2_with_unequal_shares_equals_one_process(sharded, name):
    """Micro-batches of other sizes on each rank (5 and 3 examples): `accumulate_and_step`
    weights them by the global count, so FSDP2's average over the ranks gives the
    global-batch gradient; clipping and SAM's norm span the shards."""
    for r in sharded[1]:
        assert r["accumulate"][name] <= TOL, (name, r["accumulate"][name])


def test_sam_local_perturbation_is_refused_under_fsdp2(sharded):
    for r in sharded[1]:
        assert "perturbation='local'" in (r["accumulate"]["local"] or ""), r["accumulate"]


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_in_one_ranks_shard_makes_every_rank_skip(sharded, name):
    for r in sharded[1]:
        same, skipped = r["nonfinite"][name]
        assert same and skipped == 1, name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")    # DCP's 1-process note
@pytest.mark.parametrize("name", NAMES)
def test_a_distributed_checkpoint_resumes_on_two_ranks_and_on_one(sharded, name):
    """Saved with 2 ranks: loaded on 2 ranks, the run continues bit for bit as the
    uninterrupted one; loaded into one unsharded process (resharded by
    torch.distributed.checkpoint), it continues as the uninterrupted run up to summation
    order."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    out, results = sharded
    for r in results:
        assert r["dcp"][name][0], name
    make = dict(CONFIGS)[name]
    model = _Model()
    opt = make(model.parameters())
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(out / f"dcp-{name}"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert all(st["step"] == 3 for st in opt.state.values())
    _train(model, opt, range(3, 5))
    final = results[0]["dcp"][name][1]
    assert max(_scaled(p, q) for p, q in zip(model.parameters(), final)) <= TOL


@pytest.mark.parametrize("cls, kw", ZERO, ids=[c.__name__ for c, _ in ZERO])
def test_zero_redundancy_optimizer_around_every_optimizer(sharded, cls, kw):
    """``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class=optimlab.X)``
    under DDP on 2 ranks equals optimlab.X on one process and the whole batch; its
    consolidated state dict loads into a plain optimlab.X, which then continues as the ranks
    would."""
    for r in sharded[1]:
        assert r["zero"][cls.__name__][0] <= TOL
    _, sd, weights, after = sharded[1][0]["zero"][cls.__name__]
    model = _Model()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    opt = cls(model.parameters(), **kw)
    opt.load_state_dict(sd)
    assert all(st["step"] == 3 for st in opt.state.values())
    _train(model, opt, range(3, 4))
    assert max(_scaled(p, q) for p, q in zip(model.parameters(), after)) <= TOL
