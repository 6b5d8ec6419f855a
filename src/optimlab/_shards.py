"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): every kernel runs on
this process's shard, and every quantity that spans shards is an explicit collective over the
parameter's device mesh, written where the math needs it.

A DTensor ``p`` of global shape S lives on a device mesh; for each mesh dimension its
placement is ``Shard(d)`` (tensor dimension d is split across that mesh dimension, in
``torch.chunk`` sizes: uneven sizes leave the last ranks a smaller, possibly empty, shard),
``Replicate()`` (every rank holds the same values) or ``Partial`` (summands; never a
parameter's).  ``p.to_local()`` is this rank's shard: a plain tensor sharing the parameter's
memory, so an in-place update of it is an update of the parameter.

What an optimizer needs, in those terms:

* element-wise rules (SGD, AdaGrad, RMSProp, the Adam family, RAdam) are local: the update of
  each element reads only that element of the parameter, gradient and state.  Their state is
  created with the parameter's placement (``zeros_like`` of the DTensor), so distributed
  checkpointing sees it sharded, and the kernels (fused, foreach, reference) run on the local
  shards (`local_views`).  No communication.
* the non-finite verdict: every rank must skip together, or the replicas of one model
  diverge; `agree` all-reduces one flag per step over each mesh involved.
* reductions over a tensor (Adafactor's column/row statistics, RMS(theta), RMS(U); SAM's
  gradient norm): a sum over dimension d of the global tensor is the local sum, all-reduced
  over the mesh dimensions that shard d (`Reduction`).  Nothing else moves: Adafactor sends
  O(rows + columns) numbers per matrix, never the matrix.
"""

from __future__ import annotations

from typing import Sequence

import torch

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_DTENSOR: list = []


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None where torch.distributed is missing."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:                # a torch built without distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    tp = type(t)
    if tp is _Tensor or tp is _Parameter or not isinstance(t, _Tensor):
        return False
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (this process's part, sharing its memory), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def check_placements(p: torch.Tensor) -> None:
    """A parameter is sharded or replicated on each mesh dimension, never partial."""
    for i, pl in enumerate(p.placements):
        if pl.is_partial():
            raise ValueError(f"a DTensor parameter with a Partial placement on mesh dimension {i} "
                             f"({p.placements}): an optimizer needs its values; call "
                             f"redistribute() to Shard or Replicate first")


def local_views(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: Sequence[dict]) -> tuple[list, list, list]:
    """The local shards of parameters, gradients and state tensors (plain tensors sharing
    their memory), for the kernels; a state dict's other entries (``step``) are copied, so
    the caller writes them back (`write_back`).  A gradient laid out otherwise than its
    parameter (another placement, e.g. ``Partial``) is redistributed to the parameter's
    placement first: a collective, the only one an element-wise rule can need."""
    lps, lgs, lsts = [], [], []
    for p, g, st in zip(params, grads, states):
        if is_dtensor(p):
            check_placements(p)
            if not is_dtensor(g):
                raise TypeError(f"a DTensor parameter of shape {tuple(p.shape)} has a "
                                f"{type(g).__name__} gradient: both must be DTensors")
            if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
                g = g.redistribute(p.device_mesh, p.placements)
            lps.append(p.to_local())
            lgs.append(g.to_local())
            lsts.append({k: (v.to_local() if is_dtensor(v) else v) for k, v in st.items()})
        else:
            lps.append(p)
            lgs.append(g)
            lsts.append(st)
    return lps, lgs, lsts


def write_back(states: Sequence[dict], views: Sequence[dict]) -> None:
    """Copy the non-tensor entries (the step counter) of `local_views`' state dicts back."""
    for st, view in zip(states, views):
        if view is not st:
            for k, v in view.items():
                if not isinstance(v, _Tensor):
                    st[k] = v


# --------------------------------------------------------------------------- collectives
def _meshes(tensors) -> list:
    """The distinct meshes of the DTensors among ``tensors`` (FSDP2 gives each ``fully_shard``
    call a mesh object of its own: equal meshes count once)."""
    out = []
    for t in tensors:
        if is_dtensor(t):
            mesh = t.device_mesh
            if not any(mesh is m or mesh == m for m in out):
                out.append(mesh)
    return out


def agree(ok: bool, tensors: Sequence[torch.Tensor]) -> bool:
    """``ok`` on every rank of the meshes of the DTensors among ``tensors`` (their logical
    AND: one all-reduce of one number per mesh dimension, MIN), else ``ok`` itself."""
    meshes = _meshes(tensors)
    if not meshes:
        return ok
    import torch.distributed as dist
    flag = None
    for mesh in meshes:
        if flag is None or flag.device.type != mesh.device_type:
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=mesh.device_type)
        for d in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(d))
        ok = bool(flag.item())
    return ok


def all_reduce_sum(t: torch.Tensor, mesh, mesh_dims: Sequence[int]) -> torch.Tensor:
    """Sum ``t`` (a plain tensor, in place) over the ranks of ``mesh_dims`` of ``mesh``."""
    if mesh_dims:
        import torch.distributed as dist
        t = t.contiguous()
        for d in mesh_dims:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
    return t


def sharding_dims(p: torch.Tensor, dims: Sequence[int] | None = None) -> list[int]:
    """The mesh dimensions that shard any of the tensor dimensions ``dims`` of DTensor ``p``
    (all of its dimensions when None): those a sum over ``dims`` must all-reduce over."""
    nd = p.dim()
    want = None if dims is None else {d % nd for d in dims}
    return [i for i, pl in enumerate(p.placements)
            if pl.is_shard() and (want is None or pl.dim % nd in want)]


class Reduction:
    """Whole-tensor and per-dimension reductions of a tensor that may be a DTensor's shard:
    the local computation, all-reduced over the mesh dimensions that shard what is reduced.

    ``Reduction(p)`` for a plain tensor reproduces torch's own reductions exactly (``mean``,
    ``norm``); for a DTensor ``p`` each reduction is the local sum, one all-reduce (SUM) over
    ``sharding_dims``, divided by the global size.  Dimensions are those of the parameter:
    ``of`` names the parameter dimension a reduction runs over, whatever tensor (the
    parameter, or a statistic that dropped some of its dimensions) holds it."""

    def __init__(self, p: torch.Tensor):
        self.sharded = is_dtensor(p)
        self.shape = tuple(p.shape)                 # global
        self.numel = p.numel()
        self._p = p if self.sharded else None
        if self.sharded:
            check_placements(p)
            self.mesh = p.device_mesh

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """||x||_2 over the whole (global) tensor; a 0-dim tensor."""
        if not self.sharded:
            return x.norm(2)
        s = all_reduce_sum(x.square().sum().reshape(1), self.mesh, sharding_dims(self._p))
        return s.sqrt().reshape(())

    def mean(self, x: torch.Tensor, dim: int, of: int, keepdim: bool = False) -> torch.Tensor:
        """The mean of ``x`` over its dimension ``dim``, which is the parameter's dimension
        ``of``."""
        if not self.sharded:
            return x.mean(dim=dim, keepdim=keepdim)
        s = all_reduce_sum(x.sum(dim=dim, keepdim=keepdim), self.mesh,
                           sharding_dims(self._p, (of,)))
        return s.div_(self.shape[of])

    def mean_sq(self, g: torch.Tensor, dim: int) -> torch.Tensor:
        """The mean of g^2 over the parameter's dimension ``dim`` (torch.optim's form,
        ||g||^2 / n, where nothing is sharded)."""
        if not self.sharded:
            return torch.linalg.vector_norm(g, dim=dim).square_().div_(g.size(dim))
        return self.mean(g * g, dim, of=dim)


def reduced_zeros(p: torch.Tensor, drop: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``p``'s shape without dimension ``drop`` (a statistic reduced over it), a
    DTensor on ``p``'s mesh when ``p`` is one: a mesh dimension that shards ``drop`` is
    replicated in the result (the all-reduced statistic is the same on its ranks), one that
    shards a later dimension shards the one it became."""
    nd = p.dim()
    drop %= nd
    shape = tuple(p.shape[:drop]) + tuple(p.shape[drop + 1:])
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dzeros
    placements = []
    for pl in p.placements:
        if not pl.is_shard():
            placements.append(pl)
        elif type(pl) is not Shard:
            raise NotImplementedError(f"a parameter placement {pl} (strided sharding, FSDP2 "
                                      f"with tensor parallelism on one dimension) for a "
                                      f"factored statistic")
        elif pl.dim % nd == drop:
            placements.append(Replicate())
        else:
            placements.append(Shard(pl.dim % nd - (pl.dim % nd > drop)))
    return dzeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=placements)
