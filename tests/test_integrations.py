"""optimlab inside the Hugging Face Trainer and accelerate (issue 17), for real, on a tiny BERT
built from a config (no download): every optimizer resumes from a Trainer checkpoint (or
accelerate's save_state) to the weights of an uninterrupted run, and SAM in `SAMTrainer` (or
`optimlab.accumulate_and_step` on accelerate's prepared objects) equals
`optimlab.accumulate_and_step` over the same micro-batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import optimlab

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from optimlab.integrations.huggingface import SAMTrainer, find_sam  # noqa: E402

MICRO = 2          # examples per micro-batch
ACCUM = 4          # micro-batches per update


def tiny_bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def dataset(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(1, 40, (8,), generator=g),
                 attention_mask=torch.ones(8, dtype=torch.long),
                 labels=torch.randint(0, 3, (), generator=g)) for _ in range(n)]


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=MICRO,
                gradient_accumulation_steps=ACCUM, use_cpu=True, report_to=[],
                logging_strategy="no", save_strategy="no", seed=0, disable_tqdm=True,
                max_grad_norm=0.5, learning_rate=1e-2, lr_scheduler_type="linear",
                warmup_steps=2)
    return transformers.TrainingArguments(**{**base, **kw})


def trainer(model, optimizer, out, cls=SAMTrainer, **kw):
    t = cls(model=model, args=args(out, **kw), train_dataset=dataset(),
            optimizers=(optimizer, None))
    # BertForSequenceClassification takes **kwargs but its loss ignores num_items_in_batch,
    # so the Trainer would sum the micro-batches' mean losses (transformers#47688): the
    # Trainer's documented switch makes it average them
    t.model_accepts_loss_kwargs = False
    return t


OPTIMIZERS = {
    "adamw": lambda m: optimlab.AdamW(optimlab.param_groups_weight_decay(m, 0.01), lr=1e-2),
    "adafactor": lambda m: optimlab.Adafactor(m.parameters(), lr=1e-2, relative_step=False,
                                              beta1=0.9),
    "sgd": lambda m: optimlab.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True),
    "radam-fold": lambda m: optimlab.RAdam(m.parameters(), lr=1e-2, weight_decay=0.1,
                                           wd_mode="decoupled", wd_form="fold"),
    "sam-adamw": lambda m: optimlab.SAM(optimlab.param_groups_weight_decay(m, 0.01),
                                        optimlab.AdamW, rho=0.5, lr=1e-2),
}


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_run_resumed_from_a_trainer_checkpoint_ends_where_an_uninterrupted_one_does(
        tmp_path, name):
    """Trainer(optimizers=(optimlab optimizer, None)), 6 updates of 4 micro-batches with a
    linear schedule and warmup, stopped after 3 and resumed from the Trainer's checkpoint
    (optimizer.pt, scheduler.pt, the data order): the same weights, bit for bit."""
    make = OPTIMIZERS[name]
    model = tiny_bert()
    trainer(model, make(model), tmp_path / "full", max_steps=6).train()
    full = weights(model)

    model = tiny_bert()
    t = trainer(model, make(model), tmp_path / "cut", max_steps=6, save_strategy="steps",
                save_steps=3)
    t.train()
    assert any(not torch.equal(a, b) for a, b in zip(full, weights(tiny_bert())))
    model = tiny_bert(seed=5)                     # other weights: the checkpoint must load
    t = trainer(model, make(model), tmp_path / "cut", max_steps=6)
    t.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert t.state.global_step == 6
    for a, b in zip(weights(model), full):
        assert torch.equal(a, b)


def _recording(cls):
    class Recording(cls):
        """Keeps the micro-batches the Trainer feeds its first passes."""
        seen: list = []

        def training_step(self, model, inputs, *a, **k):
            self.seen.append({key: v.clone() for key, v in inputs.items()})
            return super().training_step(model, inputs, *a, **k)
    Recording.seen = []
    return Recording


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_in_the_trainer_equals_accumulate_and_step(tmp_path, adaptive, bf16):
    """Three updates of 4 micro-batches with clipping (and bf16 autocast): `SAMTrainer` runs
    both passes over every micro-batch and clips the second-pass gradient, so it ends where
    `optimlab.accumulate_and_step` over the same micro-batches does (1e-6).  The plain
    Trainer with the same SAM cannot step at all (SAM needs its first step)."""
    def make(m):
        return optimlab.SAM(m.parameters(), optimlab.AdamW, rho=0.5, adaptive=adaptive,
                            lr=1e-2, weight_decay=0.01)
    model, ref = tiny_bert(), tiny_bert()
    cls = _recording(SAMTrainer)
    t = trainer(model, make(model), tmp_path, cls=cls, max_steps=3, bf16=bf16,
                lr_scheduler_type="constant", warmup_steps=0)
    t.train()
    assert len(cls.seen) == 3 * ACCUM
    sam = make(ref)
    for u in range(3):
        ref.train()
        optimlab.accumulate_and_step(ref, sam, cls.seen[u * ACCUM:(u + 1) * ACCUM],
                                     lambda m, b: m(**b).loss, max_grad_norm=0.5,
                                     autocast=torch.bfloat16 if bf16 else None)
    for a, b in zip(weights(model), weights(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not find_sam(t.optimizer).perturbed
    if bf16:                       # the Trainer's autocast is on: float32 ends elsewhere
        fp32 = tiny_bert()
        sam = make(fp32)
        for u in range(3):
            optimlab.accumulate_and_step(fp32, sam, cls.seen[u * ACCUM:(u + 1) * ACCUM],
                                         lambda m, b: m(**b).loss, max_grad_norm=0.5)
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(weights(model), weights(fp32)))

    model = tiny_bert()
    plain = trainer(model, make(model), tmp_path / "plain",
                    cls=transformers.Trainer, max_steps=1)
    with pytest.raises(RuntimeError, match="SAM.step\\(\\) needs a closure"):
        plain.train()


def _with_scaler(t):
    """fp16 as accelerate runs it on a GPU (a GradScaler, native autocast); on a CPU it makes
    neither, so the test hands them to the CPU accelerator."""
    t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    t.accelerator.native_amp = True
    return t


def test_sam_in_the_trainer_with_a_loss_scaler(tmp_path):
    """fp16 with a loss scaler: equal to `optimlab.accumulate_and_step` with the same scaler
    (bit for bit); an inf in either pass skips the update, leaves w where it was (a second
    pass's inf after w was perturbed: the mixin restores it) and halves the scale."""
    def make(m):
        return optimlab.SAM(m.parameters(), optimlab.AdamW, rho=0.5, lr=1e-2)
    model, ref = tiny_bert(), tiny_bert()
    cls = _recording(SAMTrainer)
    t = _with_scaler(trainer(model, make(model), tmp_path, cls=cls, max_steps=3, fp16=True,
                             lr_scheduler_type="constant", warmup_steps=0))
    t.train()
    sam, scaler = make(ref), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for u in range(3):
        ref.train()
        optimlab.accumulate_and_step(ref, sam, cls.seen[u * ACCUM:(u + 1) * ACCUM],
                                     lambda m, b: m(**b).loss, max_grad_norm=0.5,
                                     scaler=scaler, autocast=torch.float16)
    for a, b in zip(weights(model), weights(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    class Overflow(SAMTrainer):
        at = 0                     # the forward (1-4: first pass, 5-8: second) that overflows
        calls = 0

        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            Overflow.calls += 1
            return loss * float("inf") if Overflow.calls == Overflow.at else loss
    for at in (2, 6):
        Overflow.at, Overflow.calls = at, 0
        model = tiny_bert()
        start = weights(model)
        t = _with_scaler(trainer(model, make(model), tmp_path / str(at), cls=Overflow,
                                 max_steps=1, fp16=True))
        t.train()
        assert Overflow.calls == (ACCUM if at <= ACCUM else 2 * ACCUM)
        assert all(torch.equal(a, b) for a, b in zip(weights(model), start)), at
        assert not find_sam(t.optimizer).perturbed
        assert t.accelerator.scaler.get_scale() == 2.0 ** 9


def test_the_trainer_builds_optimlab_optimizers_from_optimizer_cls_and_kwargs(tmp_path):
    """``optimizer_cls_and_kwargs``: the Trainer builds the optimizer on its own parameter
    groups (weight decay off for biases and LayerNorms, from ``args.weight_decay``); SAM with
    its base class as a keyword; the mixin finds it inside accelerate's wrapper."""
    for cls, kw in ((optimlab.AdamW, {}),
                    (optimlab.SAM, dict(base_optimizer=optimlab.AdamW, rho=0.05))):
        model = tiny_bert()
        before = weights(model)
        t = SAMTrainer(model=model, args=args(tmp_path, max_steps=2, weight_decay=0.1),
                       train_dataset=dataset(), optimizer_cls_and_kwargs=(cls, kw))
        t.train()
        opt = t.optimizer.optimizer                 # accelerate's AcceleratedOptimizer
        assert type(opt) is cls
        decays = sorted({g["weight_decay"] for g in opt.param_groups})
        assert decays == [0.0, 0.1]
        assert any(not torch.equal(a, b) for a, b in zip(before, weights(model)))
        assert (find_sam(t.optimizer) is not None) == (cls is optimlab.SAM)


def test_sam_without_a_closure_after_first_step_is_the_second_step():
    """The call the Trainer makes: ``step()`` after ``first_step()`` and the second backward
    is ``second_step()``; after a skipped first step, nothing; otherwise the closure error."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    sam = optimlab.SAM([p], optimlab.SGD, rho=0.1, lr=0.5)
    p.grad = torch.tensor([3.0, 4.0])
    assert sam.first_step(zero_grad=True)
    perturbed = p.detach().clone()
    assert torch.allclose(perturbed, torch.tensor([1.06, -1.92]))
    p.grad = torch.tensor([1.0, 1.0])
    sam.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -2.5])) and not sam.perturbed
    p.grad = torch.tensor([float("inf"), 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not sam.first_step(zero_grad=True)
    sam.step()                                   # the update was skipped: nothing happens
    assert torch.equal(p.detach(), torch.tensor([0.5, -2.5]))
    with pytest.raises(RuntimeError, match="needs a closure"):
        sam.step()


# --------------------------------------------------------------------------- accelerate
@pytest.fixture
def accelerator_factory():
    """Fresh Accelerators (accelerate keeps one process-wide state; each test resets it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(**kw):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kw)
    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _loader():
    return torch.utils.data.DataLoader(dataset(), batch_size=MICRO, shuffle=False)


def _accelerate_run(make_accelerator, make_opt, updates, state_in=None, state_out=None,
                    skip=0, **kw):
    """The accelerate loop of its docs: ``accumulate`` over ACCUM micro-batches, then
    ``step``; ``updates`` updates from batch ``skip``; save_state/load_state around it."""
    acc = make_accelerator(gradient_accumulation_steps=ACCUM, **kw)
    model = tiny_bert()
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    model, opt, loader, sched = acc.prepare(model, opt, _loader(), sched)
    if state_in is not None:
        acc.load_state(state_in)
    batches = acc.skip_first_batches(loader, skip) if skip else loader
    for i, batch in zip(range(updates * ACCUM), batches):
        with acc.accumulate(model):
            acc.backward(model(**batch).loss)
            if acc.sync_gradients:                  # the update's last micro-batch
                acc.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
    if state_out is not None:
        acc.save_state(state_out)
    return acc.unwrap_model(model)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_accelerate_accumulates_and_resumes_optimlab_optimizers(tmp_path, accelerator_factory,
                                                                name):
    """``accelerator.prepare`` / ``accumulate`` with an optimlab optimizer and scheduler: the
    update over 4 micro-batches equals `optimlab.accumulate_and_step` (1e-6), and a run saved
    with ``save_state`` after 3 updates and loaded into new objects with ``load_state`` ends
    with the uninterrupted run's weights, bit for bit."""
    make = OPTIMIZERS[name]
    full = weights(_accelerate_run(accelerator_factory, make, 6))
    _accelerate_run(accelerator_factory, make, 3, state_out=tmp_path / "state")
    resumed = _accelerate_run(accelerator_factory, make, 3, state_in=tmp_path / "state",
                              skip=3 * ACCUM)
    for a, b in zip(weights(resumed), full):
        assert torch.equal(a, b)

    ref = tiny_bert()
    opt = make(ref)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    micro = list(_loader())
    for u in range(6):
        optimlab.accumulate_and_step(ref, opt, micro[u * ACCUM:(u + 1) * ACCUM],
                                     lambda m, b: m(**b).loss, max_grad_norm=0.5)
        sched.step()
    for a, b in zip(full, weights(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sam_with_accumulation_in_an_accelerate_loop(accelerator_factory, precision):
    """SAM in an accelerate loop is `optimlab.accumulate_and_step` on the prepared model and
    optimizer (it finds the SAM inside accelerate's wrapper; accelerate's bf16 autocast wraps
    the forward): equal to the same call without accelerate (1e-6)."""
    def make(m):
        return optimlab.SAM(m.parameters(), optimlab.AdamW, rho=0.5, lr=1e-2)
    acc = accelerator_factory(mixed_precision=precision)
    model = tiny_bert()
    opt = make(model)
    model, opt = acc.prepare(model, opt)
    micro = list(_loader())
    for u in range(3):
        optimlab.accumulate_and_step(model, opt, micro[u * ACCUM:(u + 1) * ACCUM],
                                     lambda m, b: m(**b).loss, max_grad_norm=0.5)
    ref = tiny_bert()
    sam = make(ref)
    for u in range(3):
        optimlab.accumulate_and_step(ref, sam, micro[u * ACCUM:(u + 1) * ACCUM],
                                     lambda m, b: m(**b).loss, max_grad_norm=0.5,
                                     autocast=torch.bfloat16 if precision == "bf16" else None)
    for a, b in zip(weights(acc.unwrap_model(model)), weights(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
