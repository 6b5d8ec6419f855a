"""Switching library mid-run without losing the moments (issue 12): a torch.optim or
transformers state dict of the same algorithm loads into the optimlab optimizer that
reproduces it, and an optimlab state dict loads back into torch.optim / transformers; the
run then continues as the uninterrupted one.  Each case: 5 steps in library A, its state dict
(converted where the keys differ) loaded by library B on the same weights, 5 more steps in
both; B's weights equal A's within 1e-6 (float32; the parity tests find them bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch

import optimlab
from optimlab.adafactor import convert_state_dict, state_dict_format
from optimlab.compat import hf as ohf
from optimlab.compat import torch as otorch
from tests.helpers import clone_params, gradient_sequence, make_params, max_param_diff, set_grads

TOL = 1e-6

# (name, torch.optim class and kwargs, the optimlab constructor that reproduces it)
TORCH_PAIRS = [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
     otorch.SGD),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1), otorch.Adagrad),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True), otorch.RMSprop),
    ("adam", torch.optim.Adam, dict(lr=0.01, amsgrad=True), otorch.Adam),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), otorch.AdamW),
    ("radam", torch.optim.RAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
     otorch.RAdam),
    ("adafactor", torch.optim.Adafactor, dict(lr=0.01, weight_decay=0.1), otorch.Adafactor),
]


def _switch(make_a, make_b, convert=None, steps=(5, 5), export=None):
    """Library A for steps[0] steps, then B (loaded from A's state dict: ``export(opt)`` or
    ``state_dict()``, then ``convert``) and A side by side."""
    pa = make_params()
    oa = make_a(pa)
    grads = list(gradient_sequence(pa, sum(steps), seed=3))
    for noise in grads[:steps[0]]:
        set_grads(pa, noise)
        oa.step()
    sd = copy.deepcopy(export(oa) if export else oa.state_dict())        # as a checkpoint file holds it (torch.optim's
    pb = clone_params(pa)                      # load keeps the given tensors: no sharing)
    ob = make_b(pb)
    ob.load_state_dict(convert(sd) if convert else sd)
    for noise in grads[steps[0]:]:
        set_grads(pa, noise)
        set_grads(pb, noise)
        oa.step()
        ob.step()
    return max_param_diff(pb, pa)


@pytest.mark.parametrize("name, cls, kw, ours", TORCH_PAIRS, ids=[p[0] for p in TORCH_PAIRS])
def test_from_torch_optim(name, cls, kw, ours):
    assert _switch(lambda p: cls(p, **kw), lambda p: ours(p, **kw)) <= TOL


@pytest.mark.parametrize("name, cls, kw, ours", TORCH_PAIRS, ids=[p[0] for p in TORCH_PAIRS])
def test_back_to_torch_optim(name, cls, kw, ours):
    assert _switch(lambda p: ours(p, **kw), lambda p: cls(p, **kw),
                   export=otorch.torch_state_dict) <= TOL


HF_CONFIGS = [dict(), dict(beta1=0.9, weight_decay=0.01),
              dict(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9)]


@pytest.mark.parametrize("kw", HF_CONFIGS, ids=["paper", "momentum-wd", "t5-finetune"])
def test_transformers_adafactor_both_ways(kw):
    transformers = pytest.importorskip("transformers.optimization")
    kw = dict(kw)
    kw.setdefault("lr", None)

    def theirs(p):
        return transformers.Adafactor(p, **kw)

    def ours(p):
        return ohf.Adafactor(p, **kw)
    assert _switch(theirs, ours) <= TOL
    assert _switch(ours, theirs, lambda sd: convert_state_dict(sd, "transformers")) <= TOL


def test_the_formats_convert_into_each_other_and_back():
    """torch -> optimlab -> transformers -> optimlab -> torch returns the same numbers, keys
    and shapes (the group keys transformers has, and torch -> optimlab -> torch all of
    them); `state_dict_format` tells each apart."""
    ps = make_params()
    opt = torch.optim.Adafactor(ps)
    for noise in gradient_sequence(ps, 3):
        set_grads(ps, noise)
        opt.step()
    sd = opt.state_dict()
    assert state_dict_format(sd) == "torch"
    ours = convert_state_dict(sd, "optimlab")
    assert state_dict_format(ours) == "optimlab"
    hf = convert_state_dict(ours, "transformers")
    assert state_dict_format(hf) == "transformers"
    back = convert_state_dict(convert_state_dict(hf, "optimlab"), "torch")
    for pid, st in sd["state"].items():
        assert back["state"][pid].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(back["state"][pid][k], v), k
    assert back["param_groups"][0].keys() == sd["param_groups"][0].keys() - {"maximize"}
    assert convert_state_dict(ours, "torch")["param_groups"] == sd["param_groups"]


def test_a_first_moment_does_not_convert_to_torch_optim():
    ps = make_params()
    opt = optimlab.Adafactor(ps, beta1=0.9)
    for noise in gradient_sequence(ps, 1):
        set_grads(ps, noise)
        opt.step()
    with pytest.raises(ValueError, match="no first moment"):
        convert_state_dict(opt.state_dict(), "torch")
    with pytest.raises(ValueError, match="Invalid to"):
        convert_state_dict(opt.state_dict(), "jax")
