"""optimlab in PyTorch Lightning (issue 17), for real: optimlab optimizers and schedulers from
``configure_optimizers`` resume from a Lightning checkpoint bit for bit, and SAM with
micro-batches (`SAMLightningMixin`) equals `optimlab.accumulate_and_step`."""

from __future__ import annotations

import warnings

import pytest
import torch

import optimlab

pl = pytest.importorskip("pytorch_lightning")
from optimlab.integrations.lightning import SAMLightningMixin, split_batch  # noqa: E402

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(3))


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def mean_loss(net, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(x), y)


LIGHTNING_OPTIMIZERS = {
    "adamw": lambda ps: optimlab.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "adafactor": lambda ps: optimlab.Adafactor(ps, lr=1e-2, relative_step=False, beta1=0.9),
    "sam-adamw": lambda ps: optimlab.SAM(ps, optimlab.AdamW, rho=0.5, lr=1e-2),
}


class Plain(pl.LightningModule):
    """Automatic optimization: optimlab's optimizer and an lr scheduler stepped per update."""

    def __init__(self, make, seed=0):
        super().__init__()
        self.net, self.make = mlp(seed), make

    def training_step(self, batch, batch_idx):
        return mean_loss(self.net, batch)

    def configure_optimizers(self):
        opt = self.make(self.net.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 0.1 * t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WithSAM(SAMLightningMixin, Plain):
    sam_micro_batch_size = 2
    sam_max_grad_norm = 0.5

    def sam_loss(self, batch):
        return mean_loss(self.net, batch)


def fit(module, epochs, batch_size=8, ckpt=None, save=None, **kw):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y),
                                         batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # Lightning's advice on DataLoader workers
        trainer.fit(module, loader, ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return trainer


@pytest.mark.parametrize("cls", [Plain, WithSAM], ids=["automatic", "sam-mixin"])
@pytest.mark.parametrize("name", sorted(LIGHTNING_OPTIMIZERS))
def test_lightning_resumes_from_its_checkpoint_exactly(tmp_path, name, cls):
    """configure_optimizers returning an optimlab optimizer (SAM too: under automatic
    optimization, one batch per update) and a per-step scheduler: 2 epochs in one go equal 1
    epoch, a Lightning checkpoint, and ``fit(ckpt_path=...)`` into a new module, bit for
    bit; the same with `SAMLightningMixin`."""
    make = LIGHTNING_OPTIMIZERS[name]
    full = cls(make)
    fit(full, 2)
    fit(cls(make), 1, save=tmp_path / "one.ckpt")
    resumed = cls(make, seed=7)
    trainer = fit(resumed, 2, ckpt=str(tmp_path / "one.ckpt"))
    assert trainer.global_step == 2 * len(X) // 8
    for a, b in zip(weights(resumed.net), weights(full.net)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(weights(full.net), weights(mlp())))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_lightning_mixin_equals_accumulate_and_step(precision, adaptive):
    """`SAMLightningMixin`: batches of 8 cut into 4 micro-batches of 2, clipping at 0.5, an
    lr scheduler per update: the same weights as `optimlab.accumulate_and_step` over the same
    micro-batches (1e-6; bf16-mixed against its autocast=torch.bfloat16)."""
    def make(ps):
        return optimlab.SAM(ps, optimlab.AdamW, rho=0.5, adaptive=adaptive, lr=1e-2)
    module = WithSAM(make)
    trainer = fit(module, 1, precision=precision)
    assert trainer.global_step == len(X) // 8
    net = mlp()
    sam = make(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 / (1 + 0.1 * t))
    for s in range(0, len(X), 8):
        micro = split_batch((X[s:s + 8], Y[s:s + 8]), 2)
        assert len(micro) == 4
        optimlab.accumulate_and_step(net, sam, micro, mean_loss, max_grad_norm=0.5,
                                     autocast=torch.bfloat16 if precision == "bf16-mixed"
                                     else None)
        sched.step()
    for a, b in zip(weights(module.net), weights(net)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sam_under_lightnings_automatic_optimization_with_one_batch_per_update():
    """Without the mixin, Lightning's closure drives SAM (one batch per update): Lightning
    clips after each closure, so the second-pass gradient is clipped, as the helper does."""
    make = LIGHTNING_OPTIMIZERS["sam-adamw"]
    module = Plain(make)
    fit(module, 1, gradient_clip_val=0.5)
    net = mlp()
    sam = make(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 / (1 + 0.1 * t))
    for s in range(0, len(X), 8):
        optimlab.accumulate_and_step(net, sam, [(X[s:s + 8], Y[s:s + 8])], mean_loss,
                                     max_grad_norm=0.5)
        sched.step()
    for a, b in zip(weights(module.net), weights(net)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sam_lightning_mixin_refuses_what_it_cannot_do():
    class Two(WithSAM):
        def configure_optimizers(self):
            return [self.make(self.net[0].parameters()), self.make(self.net[2].parameters())]
    with pytest.raises(RuntimeError, match="drives one optimizer"):
        fit(Two(LIGHTNING_OPTIMIZERS["sam-adamw"]), 1)
    with pytest.raises(ValueError, match="sam_micro_batch_size: 0"):
        split_batch((X, Y), 0)
    module = WithSAM(LIGHTNING_OPTIMIZERS["adamw"])
    with pytest.raises(ValueError, match="cannot be switched on"):
        module.automatic_optimization = True
    parts = split_batch({"x": X[:5], "y": Y[:5], "tag": "a"}, 2)
    assert [len(p["x"]) for p in parts] == [2, 2, 1] and parts[2]["tag"] == "a"
