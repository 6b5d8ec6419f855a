"""optimlab's trainer step vs a Hugging Face loop, on the same model, batches and machine.

    python benchmarks/train_vs_hf.py                    # one SST epoch (267 updates of 32)
    python benchmarks/train_vs_hf.py --steps 60 --order random

Contenders, both full-model fine-tuning of MiniLM-L6-H384 from the same directory, 5 labels:

* **optimlab**: what ``optimlab train`` runs per update: our BERT (`build_classifier`), the
  batch collated from token ids tokenized once, `accumulate_and_step` (forward, backward,
  clipping to 1.0, step) with `optimlab.AdamW` (weight decay 0.01 on weight matrices only), a
  LambdaLR warmup + linear decay.
* **hf**: a Hugging Face script's loop: ``BertForSequenceClassification``, the batch tokenized
  by ``BertTokenizerFast`` with dynamic padding (as ``DataCollatorWithPadding``), forward,
  backward, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (decay 0.01, none on biases and
  LayerNorm), ``get_linear_schedule_with_warmup``.

Same examples per update, in the same order: ``--order grouped`` (default) takes the batches
of ``optimlab train`` (length-grouped, seeded), ``--order random`` plain shuffled batches (a
Hugging Face loop's default ``RandomSampler``).  Our head pools with BERT's pooler by default
(``--pooling pooler``), so both compute the same function.  The contenders alternate step by
step (who goes first alternates too), in one process, after 3 warm-up updates each and a reset
of weights and optimizer states, so machine noise hits both alike.  Printed: seconds for all
steps (= s/epoch for a full epoch), median s/step, and the ratio hf / optimlab (> 1: optimlab
is faster), with the git revision, versions and thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import optimlab
from optimlab.data import load_split
from optimlab.models import build_classifier, default_model_dir, load_tokenizer
from optimlab.loop import epoch_batches, schedule
from optimlab.train import Example, _collate, _loss_fn
from optimlab.registry import param_groups_weight_decay


def build_ours(model_dir, pooling, lr, total, warmup):
    torch.manual_seed(0)
    model = build_classifier(model_dir, num_labels=5, pooling=pooling,
                             fine_tune_mode="full-model")
    if model.pooling != "pooler":
        model.encoder.pooler.requires_grad_(False)
    opt = optimlab.AdamW(param_groups_weight_decay(model, 0.01), lr=lr)
    sched = schedule(opt, total=total, warmup=warmup, kind="linear")
    return model.train(), opt, sched


def build_hf(model_dir, lr, total, warmup):
    import transformers
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=5, local_files_only=True)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not any(s in n for s in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters()
                          if any(s in n for s in no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    return model.train(), opt, sched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="updates to time (default: an epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--order", choices=("grouped", "random"), default="grouped")
    p.add_argument("--pooling", default="pooler", help="our head's pooling (default pooler)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model-dir", default=None)
    args = p.parse_args()
    import transformers
    transformers.logging.set_verbosity_error()

    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    records = load_split("sst", "train")
    ours_tok = load_tokenizer(model_dir, max_length=args.max_length)
    examples = [Example(r.id, e.ids, r.label)
                for r, e in zip(records, ours_tok.encode_batch([r.text for r in records]))]
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    lengths = [len(e.ids) for e in examples]
    plan = epoch_batches(lengths, args.batch_size, 11711, 0,
                         group_by_length=args.order == "grouped")
    steps = len(plan) if args.steps is None else min(args.steps, len(plan))
    total, warmup = len(plan), round(0.1 * len(plan))
    cpu = torch.device("cpu")

    def ours_step(state, batch_idx):
        model, opt, sched = state
        batch = sorted(batch_idx, key=lambda i: -lengths[i])
        mb = [_collate([examples[i] for i in batch], model.pad_token_id, cpu)]
        optimlab.accumulate_and_step(model, opt, mb, _loss_fn, max_grad_norm=1.0)
        sched.step()

    def hf_step(state, batch_idx):
        model, opt, sched = state
        enc = hf_tok([records[i].text for i in batch_idx], padding=True, truncation=True,
                     max_length=args.max_length, return_tensors="pt")
        labels = torch.tensor([records[i].label for i in batch_idx])
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    contenders = {"optimlab": (lambda: build_ours(model_dir, args.pooling, args.lr, total, warmup),
                               ours_step),
                  "hf": (lambda: build_hf(model_dir, args.lr, total, warmup), hf_step)}
    states = {}
    for name, (build, step) in contenders.items():        # warm up, then start afresh
        state = build()
        for b in plan[:3]:
            step(state, b)
        states[name] = build()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    start = time.perf_counter()
    for k, b in enumerate(plan[:steps]):
        for name in (names if k % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            contenders[name][1](states[name], b)
            times[name].append(time.perf_counter() - t)
        if (k + 1) % 25 == 0:
            print(f"  {k + 1}/{steps} steps, {time.perf_counter() - start:.0f} s", file=sys.stderr)

    try:
        rev = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse",
                              "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    print(f"optimlab {rev}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"SST train, MiniLM-L6-H384 full-model, batch {args.batch_size}, {args.order} batches, "
          f"{steps} of {len(plan)} updates, max length {args.max_length}, our pooling "
          f"{args.pooling}")
    print(f"{'':10s} {'total s':>9s} {'median s/step':>14s} {'mean s/step':>12s}")
    for name in names:
        t = times[name]
        print(f"{name:10s} {sum(t):9.1f} {statistics.median(t):14.3f} {sum(t) / len(t):12.3f}")
    ratio_total = sum(times["hf"]) / sum(times["optimlab"])
    ratio_median = statistics.median(times["hf"]) / statistics.median(times["optimlab"])
    print(f"hf / optimlab: {ratio_total:.2f}x total, {ratio_median:.2f}x median step "
          f"(> 1: optimlab is faster)")


if __name__ == "__main__":
    main()
