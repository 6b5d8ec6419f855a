"""What bf16 moments cost in accuracy: AdamW with fp32 moments vs ``state_dtype=torch.bfloat16``
on a short real training run.

The run: a character-level GPT-2 (`optimlab.models.GPT2Model`, 2 layers, d_model 128, 4 heads,
context 128, the output layer tied to the token embedding; 0.41M parameters, no dropout)
trained on the text of the SST training sentences shipped with optimlab, AdamW (optimlab's
default CS224N semantics, lr 3e-3 with a cosine decay to 10%, weight decay 0.01 on matrices),
batch 16 windows of 128 characters, 600 steps.  Every run sees the same initial weights and
the same batches, except the "other data order" run, which measures ordinary run-to-run
variation for scale.  Reported: the training loss (mean of the last 50 steps), the loss on a
fixed set of windows from the SST dev sentences, and how far the bf16 run's weights end from
the fp32 run's, relative to how far training moved them.

With ``--seeds N`` (N >= 2) the comparison is paired over N data orders: for each order an fp32
and a bf16 run; reported are each pair's dev losses and their difference (mean and standard
deviation over the orders), against the spread of the fp32 runs across orders.

    python benchmarks/bf16_moments.py [--steps 600] [--seeds N]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import optimlab
from optimlab.data import load_split
from optimlab.models import GPT2Model
from optimlab.models.gpt2 import GPT2Config

CTX, BATCH = 128, 16


def text(split: str) -> str:
    return "\n".join(r.text for r in load_split("sst", split))


def build(vocab: int, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=CTX, n_embd=128, n_layer=2, n_head=4,
                     embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    return GPT2Model(cfg)


def loss_of(model: GPT2Model, x: torch.Tensor) -> torch.Tensor:
    h = model(x[:, :-1])
    logits = h @ model.wte.weight.t()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def windows(data: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - CTX - 1, (n,), generator=gen)
    return torch.stack([data[s:s + CTX + 1] for s in starts.tolist()])


def train(data, dev, vocab, steps, state_dtype=None, order_seed=1):
    model = build(vocab)
    theta0 = [p.detach().clone() for p in model.parameters()]
    groups = optimlab.param_groups_weight_decay(model, 0.01)
    opt = optimlab.AdamW(groups, lr=3e-3, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(order_seed)
    losses = []
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
        x = windows(data, BATCH, gen)
        opt.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        dev_loss = sum(loss_of(model, dev[i:i + 32]).item() for i in range(0, len(dev), 32)) \
            / math.ceil(len(dev) / 32)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    n = sum(p.numel() for p in model.parameters())
    return dict(model=model, theta0=theta0, losses=losses, dev=dev_loss, state_bpp=state / n)


def distance(a, b) -> float:
    return math.sqrt(sum(((x.detach() - y.detach()) ** 2).sum().item() for x, y in zip(a, b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=1,
                    help="N >= 2: paired fp32/bf16 runs over N data orders")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        ap.error("--steps and --seeds must be positive")
    train_text, dev_text = text("train"), text("dev")
    chars = sorted(set(train_text + dev_text))
    idx = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([idx[c] for c in train_text])
    dev = windows(torch.tensor([idx[c] for c in dev_text]), 256, torch.Generator().manual_seed(0))
    print(f"vocabulary {len(chars)} characters, {data.numel():,} training characters, "
          f"{args.steps} steps of {BATCH} x {CTX}")
    if args.seeds > 1:
        return paired(data, dev, len(chars), args.steps, args.seeds)
    runs = {}
    for name, kw in (("fp32 moments", {}), ("bf16 moments", dict(state_dtype=torch.bfloat16)),
                     ("fp32, other data order", dict(order_seed=2))):
        t0 = time.perf_counter()
        runs[name] = train(data, dev, len(chars), args.steps, **kw)
        runs[name]["seconds"] = time.perf_counter() - t0
    ref = runs["fp32 moments"]
    moved = distance(list(ref["model"].parameters()), ref["theta0"])
    print(f"model: {sum(p.numel() for p in ref['model'].parameters()):,} parameters; "
          f"training moved the weights by {moved:.3f} (L2)\n")
    print("| run | state B/param | train loss (last 50) | dev loss | weights vs fp32 run "
          "(L2, / distance moved) | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        d = distance(list(r["model"].parameters()), list(ref["model"].parameters()))
        last = r['losses'][-50:]
        print(f"| {name} | {r['state_bpp']:.1f} | {sum(last) / len(last):.4f} | "
              f"{r['dev']:.4f} | {d:.4f} ({d / moved:.2%}) | {r['seconds']:.0f} |")
    print("\nloss curve (mean of each 100 steps):")
    for name, r in runs.items():
        xs = r["losses"]
        print(f"  {name:24s} " + " ".join(f"{sum(xs[i:i + 100]) / len(xs[i:i + 100]):.3f}"
                                          for i in range(0, len(xs), 100)))
    return 0


def paired(data, dev, vocab, steps, seeds) -> int:
    rows = []
    for seed in range(1, seeds + 1):
        t0 = time.perf_counter()
        a = train(data, dev, vocab, steps, order_seed=seed)
        b = train(data, dev, vocab, steps, state_dtype=torch.bfloat16, order_seed=seed)
        moved = distance(list(a["model"].parameters()), a["theta0"])
        d = distance(list(b["model"].parameters()), list(a["model"].parameters()))
        rows.append((seed, a["dev"], b["dev"], d / moved, time.perf_counter() - t0))
    print("| data order | fp32 dev loss | bf16 dev loss | bf16 - fp32 | bf16 weights vs fp32 "
          "(/ distance moved) | s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed, fa, fb, rel, sec in rows:
        print(f"| {seed} | {fa:.4f} | {fb:.4f} | {fb - fa:+.4f} | {rel:.1%} | {sec:.0f} |")

    def mean_sd(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    dm, dsd = mean_sd([fb - fa for _, fa, fb, _, _ in rows])
    fm, fsd = mean_sd([fa for _, fa, _, _, _ in rows])
    bm, bsd = mean_sd([fb for _, _, fb, _, _ in rows])
    print(f"\nfp32 dev loss {fm:.4f} +- {fsd:.4f} (sd over {seeds} data orders); bf16 "
          f"{bm:.4f} +- {bsd:.4f}; paired difference bf16 - fp32 {dm:+.4f} +- {dsd:.4f} "
          f"(standard error {dsd / math.sqrt(seeds):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
