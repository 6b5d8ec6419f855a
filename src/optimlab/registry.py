"""Optimizers by name, and the parameter-group helper that keeps biases and norms out of decay.

>>> import optimlab
>>> optimlab.list_optimizers()
['adafactor', 'adagrad', 'adam', 'adamw', 'amsgrad', 'radam', 'rmsprop', 'sgd', 'sgdw']
>>> opt = optimlab.create_optimizer(model, "adamw", lr=3e-5, weight_decay=0.01)

`create_optimizer` takes a model or an iterable of parameters.  Given a model and a non-zero
``weight_decay``, it builds two groups with `param_groups_weight_decay` (decay on weight
matrices only), as timm's ``create_optimizer_v2`` and nanoGPT do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: where its class lives, the defaults the name adds, its paper,
    and how a fine-tuning loop uses it: ``scheduled``, the options for a loop whose lr
    schedule sets the step size (Adafactor's own relative step and parameter scale off), and
    the peak learning rates ``optimlab train`` starts from (`optimlab.train.default_lr`)."""

    name: str
    target: str                      # "module:Class" inside optimlab, imported on first use
    description: str
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    scheduled: dict[str, Any] = field(default_factory=dict)
    lr_full_model: float = 5e-5      # fine-tuning every weight of the embedded MiniLM-L6
    lr_head: float = 1e-3            # the head alone (last-linear-layer)

    @property
    def cls(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(f"optimlab.{module}"), attr)


# The learning rates: adamw's full-model rate was tuned on the embedded MiniLM-L6 (SST-5 dev, 2
# epochs: 5e-5 -> 0.479 (3 epochs: 0.481), 1e-4 -> 0.501; a small model likes a larger rate:
# for BERT-base use 2e-5..5e-5); the others are starting points, not tuned here.
_SPECS = [
    OptimizerSpec("sgd", "sgd:SGD", "SGD with momentum, dampening, Nesterov and L2 decay",
                  "Robbins & Monro 1951; Sutskever et al. 2013 (momentum, Nesterov)",
                  lr_full_model=1e-2, lr_head=0.1),
    OptimizerSpec("sgdw", "sgd:SGD", "SGD with weight decay scaled by the schedule only (SGDW)",
                  "Loshchilov & Hutter 2019, Algorithm 1", {"wd_mode": "independent"},
                  lr_full_model=1e-2, lr_head=0.1),
    OptimizerSpec("adagrad", "adagrad:AdaGrad", "per-coordinate steps from summed squared gradients",
                  "Duchi, Hazan & Singer 2011", lr_full_model=1e-3, lr_head=1e-2),
    OptimizerSpec("rmsprop", "rmsprop:RMSProp", "steps scaled by an EMA of squared gradients",
                  "Tieleman & Hinton 2012 (lecture 6.5); Graves 2013 (centered)",
                  lr_full_model=1e-5, lr_head=1e-3),
    OptimizerSpec("adam", "adam:Adam", "Adam with L2 weight decay",
                  "Kingma & Ba 2015", lr_full_model=1e-4),
    OptimizerSpec("adamw", "adam:AdamW", "Adam with decoupled weight decay (CS224N semantics)",
                  "Loshchilov & Hutter 2019; Kingma & Ba 2015", lr_full_model=1e-4),
    OptimizerSpec("amsgrad", "adam:AMSGrad", "Adam with the running maximum of v",
                  "Reddi, Kale & Kumar 2018", lr_full_model=1e-4),
    OptimizerSpec("radam", "radam:RAdam", "Adam with the variance of the adaptive lr rectified",
                  "Liu et al. 2020", lr_full_model=1e-4),
    OptimizerSpec("adafactor", "adafactor:Adafactor",
                  "factored second moment, update clipping, relative step size",
                  "Shazeer & Stern 2018",
                  # the loop's lr and schedule set the step size (the T5 fine-tuning recipe)
                  scheduled={"relative_step": False, "scale_parameter": False},
                  lr_full_model=1e-4),
]
REGISTRY: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}


def list_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    key = name.lower()
    if key not in REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {', '.join(list_optimizers())}")
    return REGISTRY[key]


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              no_decay: Iterable[str] = ()) -> list[dict]:
    """Two parameter groups: weight matrices (>= 2 dims) decay, the rest does not.

    Biases, LayerNorm/BatchNorm weights and other 1-D parameters are excluded from decay, as
    are parameters whose name contains any string in ``no_decay``.  Frozen parameters
    (requires_grad=False) are left out.  Empty groups are dropped.
    """
    no_decay = tuple(no_decay)
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(s in name for s in no_decay):
            keep.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params, name: str, *, weight_decay: float | None = None,
                     filter_bias_and_norm: bool = True, scheduled: bool = False,
                     sam: dict | None = None, **kwargs) -> torch.optim.Optimizer:
    """Build a registered optimizer by name.

    ``model_or_params``: an ``nn.Module`` or what torch optimizers accept as ``params``.
    With a module, ``filter_bias_and_norm`` and a non-zero ``weight_decay``, 1-D parameters
    are put in a group without decay (`param_groups_weight_decay`).  Other keyword arguments
    go to the optimizer's constructor, over the name's own defaults (e.g. ``sgdw`` sets
    ``wd_mode="independent"``, the paper's SGDW).  ``scheduled=True``: for a loop whose lr
    schedule sets the step size, the name's ``scheduled`` options come first (Adafactor's
    relative step and parameter scale off).  ``sam``: wrap the optimizer in `optimlab.SAM`
    with these options (``rho``, ``adaptive``, ``perturbation``).
    """
    spec = get_spec(name)
    options = {**spec.defaults, **(spec.scheduled if scheduled else {}), **kwargs}
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    if isinstance(model_or_params, torch.nn.Module):
        wd = options.get("weight_decay", 0.0)
        if filter_bias_and_norm and wd:
            params = param_groups_weight_decay(model_or_params, wd)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    if sam is not None:
        from .sam import SAM
        return SAM(params, spec.cls, **sam, **options)
    return spec.cls(params, **options)
