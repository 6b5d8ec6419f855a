"""Fine-tune a pretrained transformer on sentiment data: ``optimlab train``.

    optimlab train                                   # MiniLM-L6 on SST-5 with AdamW, all defaults
    optimlab train --task cfimdb --optimizer radam --sam --rho 0.05 --out runs/cfimdb-radam-sam
    optimlab train --resume runs/cfimdb-radam-sam    # continue from the last checkpoint
    torchrun --nproc_per_node=2 -m optimlab.cli train ...   # data-parallel (gloo/nccl)
    torchrun --nproc_per_node=2 -m optimlab.cli train --fsdp ...   # sharded (FSDP2)

From Python: ``metrics = train(TrainConfig(task="sst", lr=5e-5))`` or ``resume("runs/sst-adamw")``.

Top to bottom: `_setup` (processes and device -> data, tokenized once -> model -> optimizer,
`create_optimizer` with the registry's training defaults, in `SAM` with ``sam=True`` ->
schedule, linear warmup then linear/cosine decay) -> `_load_run_state` when resuming -> the
loop, `optimlab.loop.Fit` (the one the lab runs too): for each epoch, length-grouped batches in
a seeded order, one `accumulate_and_step` per batch (every optimizer, SAM or not: micro-batches
are weighted by their share of the examples, so accumulation and DDP give the global-batch
gradient) -> at each epoch's end dev accuracy, best weights, `_save_run_state` (the
checkpoint), metrics -> at the end, predictions of the best model and ``metrics.json``.

What a run directory holds (``--out``, default ``runs/<task>-<optimizer>``):

    checkpoint.pt           the last state: model, optimizer, scheduler, RNG of every process,
                            epoch and step within it, the epoch's batch order, history, config
                            (written to a temporary file, then renamed: a crash mid-save leaves
                            the previous checkpoint intact)
    sharded/<step>-<id>/    with --fsdp: the model and optimizer as a torch.distributed.checkpoint
                            (each process writes its shards; checkpoint.pt names the directory
                            and holds the rest), loadable by any number of processes
    best_model.safetensors  the weights of the epoch with the best dev accuracy
    predictions/<mode>-<task>-dev-out.csv, ...-test-out.csv
                            the CS224N format: a header ``id \\t Predicted_Sentiment`` and one
                            ``<id> , <label>`` line per example
    metrics.json            config, per-epoch loss / dev accuracy / time / throughput, best
                            epoch, wall time, peak memory, package versions, git revision

Batches.  ``batch_size`` is the number of examples per optimizer update over *all* processes
and micro-batches; ``grad_accum`` splits each process's share into that many micro-batches
(less memory, the same update); ``torchrun --nproc_per_node=N`` splits each batch over N
processes (the same update again), replicating the model (DDP) or, with ``--fsdp``, sharding
weights, gradients and optimizer state over them (FSDP2: each transformer block, then the
rest, ``fully_shard``ed; one process with ``--fsdp`` trains unsharded and writes the same
checkpoints, so a run moves between numbers of processes with ``--resume``).  With
``group_by_length`` (default) each epoch shuffles the examples, sorts chunks of 50 batches by
length, cuts them into batches and shuffles the batches: little padding (about 1.8x faster on
SST), still a random order.  Resuming is exact:
the checkpoint holds the epoch's batch order and every process's RNG state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._common import WD_FORMS, WD_MODES
from ._run import RunLock, atomic_save, atomic_write, environment, json_safe, remove_temp_files
from .data import TASKS, load_file, load_split
from .loop import (SCHEDULES, Fit, Position, epoch_batches, length_grouped_batches,
                   lr_multiplier, schedule, updates_per_epoch, warmup_updates)
from .registry import create_optimizer, get_spec, list_optimizers, param_groups_weight_decay
from .wd_scheduler import WD_SCHEDULES, wd_schedule

__all__ = ["TrainConfig", "train", "resume", "SCHEDULES", "default_lr", "length_grouped_batches",
           "lr_multiplier", "atomic_save", "write_predictions"]

FINE_TUNE_MODES = ("full-model", "last-linear-layer")
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.safetensors"
METRICS = "metrics.json"
SHARDED = "sharded"          # --fsdp: the torch.distributed.checkpoints checkpoint.pt names

# Per-task defaults (None in TrainConfig means "take it from here").  SST sentences are short;
# CFIMDB reviews are long (median ~300 tokens), so they get 512 tokens and micro-batches of 8.
TASK_DEFAULTS = {
    "sst":    dict(max_length=128, grad_accum=1, epochs=2),
    "cfimdb": dict(max_length=512, grad_accum=4, epochs=3),
    None:     dict(max_length=128, grad_accum=1, epochs=3),       # your own files
}

def default_lr(optimizer: str, fine_tune_mode: str) -> float:
    """The learning rate ``optimlab train`` uses when ``--lr`` is not given: the registry's
    (`optimlab.registry.OptimizerSpec`: ``lr_full_model``, ``lr_head``)."""
    spec = get_spec(optimizer)
    return spec.lr_head if fine_tune_mode == "last-linear-layer" else spec.lr_full_model


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoint and metrics.json).  ``None`` fields
    are filled by `TrainConfig.resolved` from the task's defaults."""

    # data: a shipped task, or your own files (TSV/CSV with a header; see optimlab.data)
    task: str | None = None              # "sst" (SST-5, 5 labels) or "cfimdb" (2); default sst
    train_file: str | None = None        # your own data instead of a task (needs dev_file)
    dev_file: str | None = None
    test_file: str | None = None         # optional; unlabeled is fine
    num_labels: int | None = None        # own files: default max label + 1
    max_train_samples: int | None = None  # first N training examples only (smoke tests)
    max_eval_samples: int | None = None   # first N dev and test examples only
    # model
    model_dir: str | None = None         # Hugging Face BERT/GPT-2 directory; None: embedded MiniLM
    fine_tune_mode: str = "full-model"   # or "last-linear-layer" (encoder frozen)
    pooling: str | None = None           # mean (BERT default), cls, pooler, last (GPT-2 default)
    dropout: float = 0.1                 # before the classifier head
    max_length: int | None = None        # tokens per example, [CLS]/[SEP] included
    # optimizer
    optimizer: str = "adamw"             # any name of `optimlab.list_optimizers()`
    lr: float | None = None              # peak learning rate; None: `default_lr`
    weight_decay: float = 0.01           # on weight matrices only (biases, norms: none)
    wd_mode: str | None = None           # any of WD_MODES; None: the optimizer's
    wd_form: str | None = None           # multiply/add/fold/compensated; None: the optimizer's
    wd_schedule: str = "constant"        # weight-decay multiplier: constant, linear, cosine
    wd_final: float = 1.0                # ... from 1 to this at the end (linear, cosine)
    sam: bool = False                    # wrap the optimizer in SAM (two passes per update)
    rho: float = 0.05                    # SAM's radius
    asam: bool = False                   # adaptive SAM (ASAM; wants rho ~ 0.5)
    max_grad_norm: float | None = 1.0    # clip the global gradient norm; None: no clipping
    # schedule and batches
    epochs: int | None = None
    batch_size: int = 32                 # examples per update, over all processes
    grad_accum: int | None = None        # micro-batches per update and process
    warmup: float = 0.1                  # < 1: fraction of all updates; >= 1: number of updates
    schedule: str = "linear"             # after warmup: linear or cosine decay to 0, or constant
    group_by_length: bool = True         # batches of similar lengths (less padding)
    eval_batch_size: int = 64
    # run
    seed: int = 11711                    # CS224N's
    device: str = "auto"                 # auto (cuda if available), cpu, cuda, cuda:N
    bf16: bool = False                   # bfloat16 autocast for forward passes
    fsdp: bool = False                   # FSDP2: shard weights, gradients, optimizer state
    out: str | None = None               # run directory; None: runs/<task>-<optimizer>
    overwrite: bool = False              # replace a finished or stopped run in `out`
    save_every: int = 0                  # also checkpoint every N updates (0: at epoch ends)
    stop_after: int | None = None        # stop after N updates in all, as if interrupted
    progress: bool = True                # tqdm progress bars

    # ---------------------------------------------------------------- defaults and checks
    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in and every value checked (ValueError /
        FileNotFoundError with a message that says what to do)."""
        c = replace(self)
        if c.train_file is not None and c.task is not None:
            raise ValueError("give either --task (a shipped data set) or --train-file/--dev-file "
                             "(your own), not both")
        if c.train_file is None:
            if c.dev_file is not None or c.test_file is not None:
                raise ValueError("--dev-file/--test-file need --train-file (your own data); "
                                 "for a shipped data set use --task alone")
            c.task = (c.task or "sst").lower()
            if c.task not in TASKS:
                raise ValueError(f"unknown task {c.task!r}; choose from {', '.join(TASKS)}, or "
                                 f"pass --train-file/--dev-file")
        else:
            if c.dev_file is None:
                raise ValueError("--train-file needs --dev-file too (the best checkpoint is "
                                 "chosen by dev accuracy)")
            for opt, path in (("--train-file", c.train_file), ("--dev-file", c.dev_file),
                              ("--test-file", c.test_file)):
                if path is not None and os.path.isdir(path):
                    raise ValueError(f"{opt} {path!r} is a directory: give a TSV/CSV file")
                if path is not None and not os.path.isfile(path):
                    raise FileNotFoundError(f"{opt} {path!r} does not exist: give a TSV/CSV file "
                                            f"with a header (sentence/text/review, "
                                            f"sentiment/label, id)")
            # absolute: a resume from another directory finds the same files
            c.train_file, c.dev_file = os.path.abspath(c.train_file), os.path.abspath(c.dev_file)
            if c.test_file is not None:
                c.test_file = os.path.abspath(c.test_file)
        c.optimizer = c.optimizer.lower()
        if c.optimizer not in list_optimizers():
            raise ValueError(f"unknown optimizer {c.optimizer!r}; choose from "
                             f"{', '.join(list_optimizers())}")
        _choice("--fine-tune-mode", c.fine_tune_mode, FINE_TUNE_MODES)
        _choice("--schedule", c.schedule, SCHEDULES)
        _choice("--wd-schedule", c.wd_schedule, WD_SCHEDULES)
        if c.wd_form is not None:
            _choice("--wd-form", c.wd_form, WD_FORMS)
        _nonnegative("--wd-final", c.wd_final)
        if c.wd_schedule == "constant" and c.wd_final != 1.0:
            raise ValueError(f"--wd-final {c.wd_final} needs --wd-schedule linear or cosine "
                             f"(constant keeps the weight decay as given)")
        if c.wd_mode is not None:
            _choice("--wd-mode", c.wd_mode, WD_MODES)
            if c.wd_mode == "timescale" and 0 < c.weight_decay < 1:
                raise ValueError(f"--wd-mode timescale takes --weight-decay as tau, the EMA "
                                 f"timescale of the weights in updates: 0 or >= 1, got "
                                 f"{c.weight_decay} (torch's lambda at lr eta is tau = 1 / (eta "
                                 f"lambda))")
        if c.num_labels is not None and c.task is not None and c.num_labels != TASKS[c.task]:
            raise ValueError(f"--num-labels is for your own files: {c.task} has "
                             f"{TASKS[c.task]} labels (got --num-labels {c.num_labels})")
        if c.model_dir is not None:
            c.model_dir = os.path.abspath(c.model_dir)
            d = Path(c.model_dir)
            if not (d / "config.json").is_file():
                what = "does not exist" if not d.exists() else "has no config.json"
                raise FileNotFoundError(
                    f"--model-dir {c.model_dir!r} {what}: give a Hugging Face checkpoint "
                    f"directory (config.json, model.safetensors, tokenizer.json), or leave "
                    f"--model-dir out for the embedded MiniLM")
        for key, value in TASK_DEFAULTS[c.task].items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        if c.lr is None:
            c.lr = default_lr(c.optimizer, c.fine_tune_mode)
        if c.out is None:
            c.out = os.path.join("runs", f"{c.task or 'custom'}-{c.optimizer}"
                                         f"{'-sam' if c.sam else ''}")
        _positive("--lr", c.lr)
        _positive("--epochs", c.epochs, integer=True)
        _positive("--batch-size", c.batch_size, integer=True)
        _positive("--grad-accum", c.grad_accum, integer=True)
        _positive("--eval-batch-size", c.eval_batch_size, integer=True)
        _positive("--max-length", c.max_length, integer=True)
        if c.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 ([CLS] and [SEP]), got {c.max_length}")
        for opt, value in (("--max-train-samples", c.max_train_samples),
                           ("--max-eval-samples", c.max_eval_samples),
                           ("--num-labels", c.num_labels), ("--stop-after", c.stop_after)):
            if value is not None:
                _positive(opt, value, integer=True)
        if c.max_grad_norm is not None:
            _positive("--max-grad-norm", c.max_grad_norm)
        _nonnegative("--weight-decay", c.weight_decay)
        _nonnegative("--rho", c.rho)
        _nonnegative("--save-every", c.save_every, integer=True)
        _nonnegative("--warmup", c.warmup)
        if c.warmup >= 1 and c.warmup != int(c.warmup):
            raise ValueError(f"--warmup must be a fraction of the updates (< 1) or a whole number "
                             f"of updates, got {c.warmup}")
        if not 0.0 <= c.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {c.dropout}")
        if c.grad_accum > c.batch_size:
            raise ValueError(f"--grad-accum {c.grad_accum} splits a batch of {c.batch_size} into "
                             f"more micro-batches than examples; lower --grad-accum or raise "
                             f"--batch-size")
        if c.asam and not c.sam:
            raise ValueError("--asam needs --sam")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2 ** 63:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {c.seed!r}")
        if c.device != "auto":
            try:
                device = torch.device(c.device)
            except (RuntimeError, ValueError, TypeError):
                raise ValueError(f"--device {c.device!r} is not a device: use auto, cpu, cuda "
                                 f"or cuda:N") from None
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"--device {c.device!r}: optimlab train runs on cpu or cuda")
        return c


def _choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _positive(option: str, value, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{option} must be a positive {'integer' if integer else 'number'}, "
                         f"got {value!r}")


def _nonnegative(option: str, value, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{option} must be >= 0, got {value!r}")


# =========================================================================== the building blocks
class Example(NamedTuple):
    id: str
    ids: list[int]          # token ids, [CLS] ... [SEP], cut at max_length
    label: int | None


def _collate(examples: list[Example], pad_id: int, device: torch.device) -> dict:
    T = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[i, :len(e.ids)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([e.label for e in examples], device=device)
    return batch


def _loss_fn(model, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"])


def _split(items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` contiguous pieces of near-equal size (no empty piece)."""
    parts = min(parts, len(items))
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (k < r)
        out.append(items[start:end])
        start = end
    return out


@torch.no_grad()
def predict(model, examples: list[Example], *, batch_size: int, pad_id: int,
            device: torch.device, autocast: Callable, rank: int = 0, world: int = 1,
            lockstep: bool = False) -> list[int]:
    """Predicted labels of ``examples``, in their order.  Batches are formed by length (less
    padding); with several processes each predicts every world-th batch and all gather.
    ``lockstep`` (FSDP: each forward gathers the weights from every process): every process
    makes the same number of forwards, the ones short of a batch on a batch they discard."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    rounds = -(-len(batches) // world) if lockstep else len(mine)
    preds: dict[int, int] = {}
    for k in range(rounds):
        b = mine[k] if k < len(mine) else batches[0]
        batch = _collate([examples[i] for i in b], pad_id, device)
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"])
        if k < len(mine):
            preds.update(zip(b, logits.argmax(-1).tolist()))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, preds)
        preds = {k: v for part in gathered for k, v in part.items()}
    model.train(was_training)
    return [preds[i] for i in range(len(examples))]


def write_predictions(path: str | os.PathLike, ids: list[str], labels: list[int]) -> None:
    """The CS224N prediction file: ``id \\t Predicted_Sentiment `` then ``<id> , <label> ``
    per line, exactly as the CS224N classifier.py writes it (written atomically)."""
    text = "id \t Predicted_Sentiment \n" + "".join(f"{i} , {p} \n" for i, p in zip(ids, labels))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _save_weights(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save as st_save
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    data = st_save(state, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"peak_rss_gb": round(rss_bytes / 2**30, 3)}
    if device.type == "cuda":
        out["peak_cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _require(module: str, purpose: str):
    from .models._checkpoint import require
    try:
        return require(module, purpose)
    except ImportError as e:
        raise ValueError(str(e)) from None


class _StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current update, with a checkpoint; a
    second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.signal_name: str | None = None          # the signal that asked, if one did
        self.signum: int | None = None
        self._old = {}
        if enabled and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        print("\noptimlab: stopping after this update (checkpoint follows); Ctrl-C again to "
              "abort", file=sys.stderr)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# =========================================================================== the entry points
def train(config: TrainConfig, *, handle_signals: bool = False,
          log: Callable[[str], None] | None = None) -> dict:
    """Run ``config`` from the start; returns the metrics (also in ``<out>/metrics.json``).

    The run directory must not hold a run already (``overwrite=True`` replaces it; `resume`
    continues it).  ``handle_signals``: Ctrl-C/SIGTERM stop after the current update with a
    checkpoint (the CLI turns this on)."""
    cfg = config.resolved()
    return _run(cfg, None, handle_signals=handle_signals, log=log)


#: options that `resume` may change; all others come from the checkpoint
RESUME_OVERRIDES = ("stop_after", "save_every", "progress", "device", "eval_batch_size")


def resume(run_dir: str | os.PathLike, *, handle_signals: bool = False,
           log: Callable[[str], None] | None = None, **overrides) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved configuration
    (``overrides``: only the options in `RESUME_OVERRIDES`).  An interrupted run resumed to the
    end has exactly the weights of an uninterrupted one."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: no {CHECKPOINT} there (start the run "
                                f"without --resume, or give the directory passed as --out)")
    bad = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if bad:
        raise ValueError(f"--resume continues {run_dir} with the options it was started with; "
                         f"drop {', '.join('--' + b.replace('_', '-') for b in bad)} (only "
                         f"{', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDES)} "
                         f"may change)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # a truncated or foreign file: say so in one line
        raise ValueError(f"{path} is not a readable optimlab checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    keys = set(state if isinstance(state, dict) else ())
    weights = {"sharded"} if "sharded" in keys else {"model", "optimizer"}
    missing = sorted({"config", "scheduler", "ranks", "position", "history", "best", *weights}
                     - keys)
    if missing:
        raise ValueError(f"{path} is not a complete optimlab checkpoint (no "
                         f"{', '.join(repr(m) for m in missing)}): start the run again with "
                         f"--overwrite")
    names = {f.name for f in fields(TrainConfig)}
    # stop_after belongs to one invocation, not to the run: only this one's counts
    saved = {k: v for k, v in state["config"].items() if k in names and k != "stop_after"}
    cfg = replace(TrainConfig(**saved), out=str(run_dir), **overrides).resolved()
    # the configuration the run continues with is the saved one; a version of optimlab that
    # resolves it otherwise (another default) would not continue the same run
    now = asdict(cfg)
    changed = sorted(k for k, v in saved.items()
                     if k not in RESUME_OVERRIDES and k not in ("out", "overwrite") and now[k] != v)
    if changed:
        raise ValueError(f"--resume {run_dir}: this optimlab resolves the saved configuration "
                         f"differently ({', '.join(f'{k}: {saved[k]!r} -> {now[k]!r}' for k in changed)}); "
                         f"resume with the optimlab that started the run")
    done = state["position"]["step"]
    if cfg.stop_after is not None and cfg.stop_after <= done:
        raise ValueError(f"--stop-after {cfg.stop_after}: this run is already at update {done}; "
                         f"give a later update, or leave --stop-after out to train to the end")
    return _run(cfg, state, handle_signals=handle_signals, log=log)


# =========================================================================== the run
@dataclass
class _Run:
    """A run set up by `_setup`: processes and device, data, model, optimizer, schedule."""
    cfg: TrainConfig
    world: int
    rank: int
    device: torch.device
    own_group: bool                   # this run initialised the process group
    say: Callable[[str], None]
    tqdm: Any
    model_dir: Path
    fingerprint: dict                 # of the data and the model files (`_fingerprint`)
    data: dict[str, list[Example]]
    num_labels: int
    model: torch.nn.Module
    train_model: torch.nn.Module      # what the loop runs: DDP around `model` under torchrun
                                      # (FSDP2 shards `model` itself)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    wd_scheduler: Any                 # an optimlab.WeightDecayScheduler, or None (constant)
    n_decay: int
    updates_per_epoch: int
    total_updates: int
    warmup: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.bf16
                else contextlib.nullcontext())

    @property
    def sharded(self) -> bool:
        """The model is FSDP2-sharded (``--fsdp`` with several processes)."""
        return self.cfg.fsdp and self.world > 1

    def predict(self, split: str) -> list[int]:
        return predict(self.model, self.data[split], batch_size=self.cfg.eval_batch_size,
                       pad_id=self.model.pad_token_id, device=self.device,
                       autocast=self.autocast, rank=self.rank, world=self.world,
                       lockstep=self.sharded)

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (sharded: gathered, every process takes part; the main
        process gets them, the others an empty dict)."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_weights(self, path: Path) -> None:
        """The weights `_save_weights` wrote into the model (sharded: each process its part)."""
        from safetensors.torch import load_file
        weights = load_file(str(path))
        if not self.sharded:
            self.model.load_state_dict(weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))


def _setup(cfg: TrainConfig, log: Callable[[str], None] | None) -> _Run:
    """Processes and device (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK), the data tokenized
    once, the model (a pretrained encoder and a fresh, seeded head), the optimizer (the
    registry's, weight decay on weight matrices only, SAM around it with ``sam``) and the
    warmup-then-decay schedule."""
    tqdm = _require("tqdm", "the training progress bars").tqdm
    _require("tokenizers", "tokenizing the training data")
    _require("safetensors", "saving the best model")
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available here; use "
                             f"--device cpu (or auto)")
        if device.type == "cuda" and world > 1 and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    say = (log or (lambda s: tqdm.write(s))) if rank == 0 else (lambda s: None)
    try:
        return _build(cfg, world, rank, device, own_group, say, tqdm)
    except BaseException:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        raise


def _build(cfg, world, rank, device, own_group, say, tqdm) -> _Run:
    """`_setup` once the processes and device are settled."""
    from .models import build_classifier, load_tokenizer
    from .models._checkpoint import default_model_dir

    # ---- data: read, tokenize once (lengths known for grouping), cap if asked
    model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
    tokenizer = _loading(model_dir, "tokenizer",
                         lambda: load_tokenizer(model_dir, max_length=cfg.max_length))
    if cfg.task is not None:
        splits = {"train": load_split(cfg.task, "train"), "dev": load_split(cfg.task, "dev"),
                  "test": load_split(cfg.task, "test-student")}
        num_labels = TASKS[cfg.task]
    else:
        splits = {"train": load_file(cfg.train_file, require_labels=True,
                                     num_labels=cfg.num_labels),
                  "dev": load_file(cfg.dev_file, require_labels=True, num_labels=cfg.num_labels)}
        if cfg.test_file is not None:
            splits["test"] = load_file(cfg.test_file, num_labels=cfg.num_labels)
        num_labels = cfg.num_labels or _labels_without_gaps(
            [(path, r) for path, name in ((cfg.train_file, "train"), (cfg.dev_file, "dev"))
             for r in splits[name]])
    limits = {"train": cfg.max_train_samples, "dev": cfg.max_eval_samples,
              "test": cfg.max_eval_samples}
    data: dict[str, list[Example]] = {}
    for name, records in splits.items():
        records = records[:limits[name]] if limits[name] else records
        encodings = tokenizer.encode_batch([r.text for r in records])
        data[name] = [Example(r.id, e.ids, r.label) for r, e in zip(records, encodings)]
    if len(data["train"]) < world:
        raise ValueError(f"{len(data['train'])} training examples cannot feed {world} processes")

    # ---- model: pretrained encoder + a fresh head, seeded
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = _loading(model_dir, "model", lambda: build_classifier(
        model_dir, num_labels=num_labels, pooling=cfg.pooling, dropout=cfg.dropout,
        fine_tune_mode=cfg.fine_tune_mode))
    if model.pooling != "pooler" and getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler.requires_grad_(False)      # unused: no gradient, no updates
    model.to(device)
    if cfg.fsdp and world > 1:
        _shard(model)                 # before the optimizer: it holds the sharded parameters

    # ---- optimizer: weight decay on weight matrices only; SAM wraps the same groups
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    options = {k: v for k, v in (("wd_mode", cfg.wd_mode), ("wd_form", cfg.wd_form))
               if v is not None}
    optimizer = create_optimizer(groups, cfg.optimizer, lr=cfg.lr, scheduled=True,
                                 sam=dict(rho=cfg.rho, adaptive=cfg.asam) if cfg.sam else None,
                                 **options)

    # ---- schedule: warmup, then decay, one multiplier per update
    per_epoch = updates_per_epoch(len(data["train"]), cfg.batch_size, world)
    total = per_epoch * cfg.epochs
    warmup = warmup_updates(cfg.warmup, total)
    scheduler = schedule(optimizer, total=total, warmup=warmup, kind=cfg.schedule)
    wd_scheduler = (wd_schedule(optimizer, total=total, kind=cfg.wd_schedule, final=cfg.wd_final)
                    if cfg.wd_schedule != "constant" else None)

    train_model = model
    if world > 1 and not cfg.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    return _Run(cfg=cfg, world=world, rank=rank, device=device, own_group=own_group, say=say,
                tqdm=tqdm, model_dir=model_dir, data=data, num_labels=num_labels, model=model,
                fingerprint=_fingerprint(data, model_dir),
                train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                wd_scheduler=wd_scheduler,
                n_decay=sum(p.numel() for g in groups if g["weight_decay"] for p in g["params"]),
                updates_per_epoch=per_epoch, total_updates=total, warmup=warmup)


#: updates the optimizer may skip (a non-finite gradient) before the run counts as diverged
MAX_SKIPPED_UPDATES = 10
#: the exit code of a diverged run (a stop by signal exits 128 + the signal's number)
EXIT_DIVERGED = 3


class _RunDirectory:
    """The run directory while a run uses it (the main process manages it): locked
    (`optimlab._run.RunLock`: a second run on it fails at once, naming the holder; the lock of
    a killed run is taken over), temporary files of interrupted saves removed, and with
    ``--overwrite`` the previous run's files set aside in ``.replaced/`` until the new run's
    first checkpoint: a new run that fails before it puts them back, and one that was killed
    before it has them put back by the next run on the directory."""

    ASIDE = ".replaced"
    ARTIFACTS = (CHECKPOINT, SHARDED, BEST_MODEL, METRICS, "predictions")

    def __init__(self, out: Path):
        self.out = out
        self.lock = RunLock(out)
        self.aside = out / self.ASIDE

    def open(self, *, fresh: bool, overwrite: bool) -> list[str]:
        """Take the directory for a run (``fresh``: a new one, not a resume); returns notes."""
        notes = [n for n in (self.lock.acquire(),) if n]
        if self.aside.exists():
            if (self.out / CHECKPOINT).exists():
                shutil.rmtree(self.aside)      # the new run had reached its first checkpoint
            else:
                self._put_back()
                notes.append(f"put back the previous run that an --overwrite had set aside in "
                             f"{self.aside} (the new run ended before its first checkpoint)")
        removed = remove_temp_files(self.out)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) of interrupted saves")
        if fresh and (self.out / CHECKPOINT).exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.out} already holds a run ({CHECKPOINT}): continue it with --resume "
                    f"{self.out}, replace it with --overwrite, or choose another --out")
            self.aside.mkdir()
            for name in self.ARTIFACTS:
                if (self.out / name).exists():
                    os.replace(self.out / name, self.aside / name)
        return notes

    def _put_back(self) -> None:
        for name in self.ARTIFACTS:
            src, dst = self.aside / name, self.out / name
            if src.exists():
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
        shutil.rmtree(self.aside, ignore_errors=True)

    def checkpointed(self) -> None:
        """The new run has its first checkpoint: the previous run is gone for good."""
        if self.aside.exists():
            shutil.rmtree(self.aside, ignore_errors=True)

    def close(self, failed: bool) -> None:
        if not self.lock.held:            # another run's directory: touch nothing
            return
        if failed and self.aside.exists() and not (self.out / CHECKPOINT).exists():
            self._put_back()
        self.lock.release()


def _loading(model_dir: Path, what: str, load: Callable):
    """``load()``, with a broken model or tokenizer file (truncated, empty, not JSON) as one
    ValueError naming the directory."""
    try:
        return load()
    except (ValueError, FileNotFoundError, ImportError):
        raise
    except Exception as e:          # safetensors' and tokenizers' own exception types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot load the {what} from {model_dir}: {first} (a truncated or "
                         f"damaged file? reinstall the model or give another --model-dir)") from None


def _labels_without_gaps(records: list[tuple[str, Any]]) -> int:
    """The number of labels of your own files: max + 1, provided every label 0..max occurs
    (a gap is a typo more often than a class with no example: one row labelled 99 would build
    a 100-class head); ``--num-labels`` declares classes that have no example."""
    present = {r.label for _, r in records}
    k = 1 + max(present)
    missing = sorted(set(range(k)) - present)
    if missing:
        path, r = max(records, key=lambda pr: pr[1].label)
        gap = (f"{missing[0]}" if len(missing) == 1 else
               f"{missing[0]}..{missing[-1]}" if missing[-1] - missing[0] == len(missing) - 1
               else f"{len(missing)} of them")
        raise ValueError(f"{path}, line {r.line}: label {r.label}, but labels {gap} never "
                         f"occur: labels must be 0..K-1 (give --num-labels K if classes "
                         f"without examples are meant)")
    return k


def _fingerprint(data: dict[str, list[Example]], model_dir: Path) -> dict:
    """sha256 of each split as the run sees it (ids, token ids, labels) and of the model
    directory's files: a resume checks that nothing changed under it."""
    import hashlib
    out = {}
    for split, examples in data.items():
        h = hashlib.sha256()
        for e in examples:
            h.update(repr((e.id, e.ids, e.label)).encode())
        out[split] = h.hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    out["model"] = h.hexdigest()
    return out


# =========================================================================== --fsdp
def _shard(model: torch.nn.Module) -> None:
    """FSDP2: each transformer block, then the rest (embeddings, pooler, head), ``fully_shard``ed
    over all processes: parameters, gradients and optimizer state become ``Shard(0)`` DTensors,
    and each block's weights are gathered only while it computes."""
    from torch.distributed.fsdp import fully_shard
    for block in model.encoder.blocks:
        fully_shard(block)
    fully_shard(model)


def _broadcast(value, world: int):
    """The main process's ``value`` on every process."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _dcp_state(run: _Run) -> tuple[Any, dict]:
    """(the optimizer torch.distributed.checkpoint handles, its template state): the model's and
    optimizer's state dicts keyed by parameter name, sharded as the parameters are (SAM's state
    is its base optimizer's; its skip count travels in checkpoint.pt)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    from .sam import SAM
    optimizer = run.optimizer.base_optimizer if isinstance(run.optimizer, SAM) else run.optimizer
    return optimizer, {"model": get_model_state_dict(run.model),
                       "optimizer": get_optimizer_state_dict(run.model, optimizer)}


def _save_sharded(run: _Run, path: Path) -> None:
    """The model and optimizer into the new directory ``path`` (each process its shards; a
    failed write, a full disk say, is an OSError on every process and the directory is
    removed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    _, state = _dcp_state(run)
    try:
        with warnings.catch_warnings():      # torch warns of one process even when told so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(path), no_dist=run.world == 1)
    except (CheckpointException, RuntimeError, OSError) as e:
        if run.is_main:
            shutil.rmtree(path, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"writing the sharded checkpoint {path} failed ({first[:300]}); the "
                      f"previous {CHECKPOINT} is intact") from None


def _load_sharded(run: _Run, path: Path) -> None:
    """`_save_sharded`'s directory into the model and optimizer, resharded to this run's
    processes (any number, one included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    if not (path / ".metadata").is_file():
        raise ValueError(f"--resume {run.out}: {CHECKPOINT} names the sharded checkpoint {path}, "
                         f"which is missing or incomplete: start the run again with --overwrite")
    # the template first: torch initialises an empty optimizer's state with a step (lr 0)
    # that may touch the parameters, which the model's state then overwrites
    optimizer, state = _dcp_state(run)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=run.world == 1)
    set_model_state_dict(run.model, state["model"])
    set_optimizer_state_dict(run.model, optimizer, state["optimizer"])


def _save_run_state(run: _Run, fit: Fit, history: list, best: dict, wall_time: float) -> None:
    """The checkpoint: the model, optimizer and scheduler, every process's RNG and loss sum of
    the epoch so far, the loop's position (the epoch's batch order included), the history and
    the configuration.  All processes take part; the main one writes (atomically).  With
    ``--fsdp`` the model and optimizer go to a new `torch.distributed.checkpoint` directory in
    ``sharded/`` first (each process writes its shards), which checkpoint.pt then names; the
    previous one is removed only once checkpoint.pt is replaced."""
    pos = fit.position()
    mine = {"rng": _rng_state(run.device),
            "loss_sum": pos["loss_sum"] if pos["batches"] is not None else None}
    per_rank = [mine]
    if run.world > 1:
        per_rank = [None] * run.world
        torch.distributed.all_gather_object(per_rank, mine)
    if run.cfg.fsdp:
        name = _broadcast(f"{pos['step']:08d}-{time.time_ns():x}", run.world)
        _save_sharded(run, run.out / SHARDED / name)
        weights = {"sharded": name}
    else:
        weights = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
    if run.is_main:
        atomic_save({
            "format": "optimlab.train/1", "config": asdict(run.cfg), **weights,
            "scheduler": run.scheduler.state_dict(), "ranks": per_rank,
            **({"wd_scheduler": run.wd_scheduler.state_dict()} if run.wd_scheduler else {}),
            "position": {"epoch": pos["epoch"], "step_in_epoch": pos["step_in_epoch"],
                         "step": pos["step"], "batches": pos["batches"],
                         "seen": pos["seen"] if pos["batches"] is not None else 0,
                         "seconds": pos["seconds"] if pos["batches"] is not None else 0.0},
            "history": history, "best": best, "world_size": run.world,
            "wall_time_s": wall_time, "fingerprint": run.fingerprint,
            "skipped_updates": run.optimizer.skipped_steps,
        }, run.out / CHECKPOINT)
        if run.cfg.fsdp:                      # checkpoint.pt names the new one: the rest go
            for old in (run.out / SHARDED).iterdir():
                if old.name != weights["sharded"]:
                    shutil.rmtree(old, ignore_errors=True)


def _load_run_state(run: _Run, state: dict) -> tuple[Position, list, dict, float]:
    """`_save_run_state`'s checkpoint into ``run``: (position, history, best, wall time).
    The data and model files must be the ones the checkpoint was written with (exact resume
    is promised for those only): a change is a ValueError naming it."""
    saved = state.get("fingerprint")
    if saved is not None:
        changed = [k for k in saved if run.fingerprint.get(k) != saved[k]]
        if changed:
            what = {"train": "the training data", "dev": "the dev data", "test": "the test data",
                    "model": f"the model files in {run.model_dir}"}
            raise ValueError(f"--resume {run.out}: {', '.join(what.get(k, k) for k in changed)} "
                             f"changed since the checkpoint was written: resume with the same "
                             f"files, or start a new run")
    if "sharded" in state:
        _load_sharded(run, run.out / SHARDED / state["sharded"])
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.wd_scheduler is not None:
        run.wd_scheduler.load_state_dict(state["wd_scheduler"])
    ranks = state["ranks"]
    mine = ranks[run.rank % len(ranks)]
    loss_sum = mine["loss_sum"]
    if len(ranks) != run.world:
        run.say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                f"{run.world}; dropout masks will differ from an uninterrupted run")
        # the epoch's loss so far is the sum over the processes that wrote it: the main
        # process carries it on, the others start from nothing
        sums = [r["loss_sum"] for r in ranks if r["loss_sum"] is not None]
        loss_sum = ([sum(x[0] for x in sums), sum(x[1] for x in sums)]
                    if sums and run.rank == 0 else None)
    _set_rng_state(mine["rng"], run.device)
    run.optimizer.skipped_steps = state.get("skipped_updates", 0)
    pos = state["position"]
    position = Position(epoch=pos["epoch"], step_in_epoch=pos["step_in_epoch"], step=pos["step"],
                        batches=pos["batches"], loss_sum=loss_sum or [0.0, 0.0],
                        seen=pos["seen"], seconds=pos["seconds"])
    return position, state["history"], state["best"], state.get("wall_time_s", 0.0)


def _run(cfg: TrainConfig, state: dict | None, *, handle_signals: bool,
         log: Callable[[str], None] | None) -> dict:
    start_time = time.perf_counter()
    directory = _RunDirectory(Path(cfg.out)) if int(os.environ.get("RANK", "0")) == 0 else None
    failed = True
    try:
        notes = directory.open(fresh=state is None, overwrite=cfg.overwrite) if directory else []
        metrics = _fit(cfg, state, handle_signals, log, start_time, notes, directory)
        failed = False
        return metrics
    finally:
        if directory is not None:
            directory.close(failed)


def _fit(cfg: TrainConfig, state: dict | None, handle_signals: bool,
         log: Callable[[str], None] | None, start_time: float, notes: list[str],
         directory: _RunDirectory | None) -> dict:
    run = _setup(cfg, log)
    out, dist, say = run.out, torch.distributed, run.say
    for note in notes:
        say(f"note: {note}")
    stop = _StopFlag(handle_signals)
    try:
        train_set = run.data["train"]
        lengths = [len(e.ids) for e in train_set]
        pad_id = run.model.pad_token_id
        n_total = sum(p.numel() for p in run.model.parameters())
        n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)

        # ---- where we are: a fresh start, or the checkpoint's position
        position, history, best, previous_wall = Position(), [], {"epoch": None, "dev_acc": -1.0}, 0.0
        if state is not None:
            position, history, best, previous_wall = _load_run_state(run, state)
        if run.world > 1:
            dist.barrier()
        env = environment() if run.is_main else {}

        def wall() -> float:
            return previous_wall + time.perf_counter() - start_time

        def save() -> None:
            _save_run_state(run, fit, history, best, wall())
            if directory is not None:
                directory.checkpointed()

        def micro_batches(batch: list[int]) -> tuple[list, int]:
            mine = sorted(batch, key=lambda i: -lengths[i])[run.rank::run.world]
            # as many micro-batches on every process (FSDP gathers weights in each forward):
            # each holds at least len(batch) // world examples
            parts = min(cfg.grad_accum, len(batch) // run.world)
            return ([_collate([train_set[i] for i in part], pad_id, run.device)
                     for part in _split(mine, parts)], len(mine))

        def progress(epoch: int, total: int, initial: int):
            return run.tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                            unit="step", disable=not (run.is_main and cfg.progress),
                            dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)

        fit = Fit(run.train_model, run.optimizer, run.scheduler, epochs=cfg.epochs,
                  plan=lambda epoch: epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch,
                                                   group_by_length=cfg.group_by_length,
                                                   world=run.world),
                  micro_batches=micro_batches, loss_fn=_loss_fn, max_grad_norm=cfg.max_grad_norm,
                  autocast=torch.bfloat16 if cfg.bf16 else None, position=position,
                  world=run.world, stop_on_nonfinite=True, progress=progress,
                  wd_scheduler=run.wd_scheduler)
        memory: dict = {}

        def write_metrics(status: str) -> dict:
            metrics = {
                "status": status, "config": asdict(cfg), "task": cfg.task,
                "num_labels": run.num_labels,
                "examples": {k: len(v) for k, v in run.data.items()},
                "parameters": {"total": n_total, "trained": n_train, "decayed": run.n_decay},
                "world_size": run.world, "device": str(run.device),
                "updates": {"per_epoch": run.updates_per_epoch, "total": run.total_updates,
                            "warmup": run.warmup, "done": fit.pos.step},
                "epochs": history, "best_epoch": best["epoch"], "best_dev_acc": best["dev_acc"],
                "wall_time_s": round(wall(), 2), "memory": memory,
                "skipped_updates": run.optimizer.skipped_steps,
                "stop_signal": stop.signal_name, **env,
            }
            nonfinite: list[str] = []
            metrics = json_safe(metrics, found=nonfinite)     # strict JSON: NaN -> null
            metrics["nonfinite_as_null"] = nonfinite
            if run.is_main:
                atomic_write(out / METRICS, lambda f: f.write(
                    (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode("utf-8")))
            return metrics

        def should_stop(fit: Fit, loss: float) -> bool:
            if run.optimizer.skipped_steps > MAX_SKIPPED_UPDATES:
                fit.diverged = True                # too many non-finite gradients
            return stop.requested or fit.pos.step == cfg.stop_after

        def after_update(fit: Fit) -> None:
            pos = fit.pos
            if cfg.save_every and pos.step % cfg.save_every == 0 and \
                    pos.step_in_epoch < len(pos.batches):
                save()

        def on_epoch_end(fit: Fit, rec) -> None:
            nonlocal best, memory
            # ---- evaluate on dev; keep the best weights and their dev predictions
            tick = time.perf_counter()
            dev_pred = run.predict("dev")
            dev = run.data["dev"]
            dev_acc = sum(p == e.label for p, e in zip(dev_pred, dev)) / len(dev)
            record = {"epoch": rec.epoch, "train_loss": rec.train_loss, "dev_acc": dev_acc,
                      "train_seconds": round(rec.train_seconds, 2),
                      "eval_seconds": round(time.perf_counter() - tick, 2),
                      "train_examples_per_s": round(rec.examples / rec.train_seconds, 2),
                      "lr_end": run.scheduler.get_last_lr()[0], "updates": rec.updates}
            if run.wd_scheduler is not None:
                record["wd_multiplier_end"] = run.wd_scheduler.get_last_multiplier()[0]
            history.append(record)
            if dev_acc > best["dev_acc"]:         # the same verdict on every process
                best = {"epoch": rec.epoch, "dev_acc": dev_acc}
                weights = run.weights()
                if run.is_main:
                    _save_weights(weights, out / BEST_MODEL, {"epoch": str(rec.epoch),
                                                              "dev_acc": f"{dev_acc:.6f}"})
                    write_predictions(out / "predictions" / _pred_name(cfg, "dev"),
                                      [e.id for e in dev], dev_pred)
            say(f"epoch {rec.epoch}/{cfg.epochs}: train loss {rec.train_loss:.4f}, dev acc "
                f"{dev_acc:.4f}{' (best)' if best['epoch'] == rec.epoch else ''}, "
                f"{rec.train_seconds:.0f} s ({record['train_examples_per_s']:.1f} ex/s), eval "
                f"{record['eval_seconds']:.0f} s")
            save()
            memory = _gather_memory(run)
            write_metrics("running" if rec.epoch < cfg.epochs else "evaluating")

        say(f"optimlab train: {cfg.task or cfg.train_file} ({len(train_set)} train / "
            f"{len(run.data['dev'])} dev), {run.model.model_type} from {run.model_dir} "
            f"({cfg.fine_tune_mode}, {n_train:,} of {n_total:,} parameters trained), "
            f"{cfg.optimizer}{' + SAM' if cfg.sam else ''} lr {cfg.lr:g}, {cfg.epochs} epochs x "
            f"{run.updates_per_epoch} updates of {cfg.batch_size} ({run.world} process(es)"
            f"{', FSDP' if cfg.fsdp else ''} x {cfg.grad_accum} micro-batches), warmup "
            f"{run.warmup} + {cfg.schedule}, "
            f"{run.device} -> {out}")
        if state is not None:
            say(f"resuming at epoch {position.epoch + 1}, update {position.step_in_epoch} of the "
                f"epoch ({position.step} in all)")

        # ---- the epochs
        status = fit.run(should_stop=should_stop, after_update=after_update,
                         on_epoch_end=on_epoch_end)
        memory = _gather_memory(run)
        if status == "diverged":                 # the last checkpoint is the last good state
            say(f"optimlab: the run diverged at update {fit.pos.step} (a non-finite loss, or "
                f"more than {MAX_SKIPPED_UPDATES} updates skipped for non-finite gradients: "
                f"{run.optimizer.skipped_steps}); the last checkpoint in {out} is from before: "
                f"lower --lr, or check the data")
            return write_metrics("diverged")
        if fit.pos.batches is not None:          # stopped inside an epoch: save and leave
            save()

        # ---- the end: test predictions of the best model, metrics
        if status == "stopped":
            say(f"stopped after update {fit.pos.step}; continue with: optimlab train --resume "
                f"{out}")
            return write_metrics("stopped")
        if run.world > 1:
            dist.barrier()                                  # the best weights are written
        run.load_weights(out / BEST_MODEL)
        if "test" in run.data:
            test_pred = run.predict("test")
            if run.is_main:
                write_predictions(out / "predictions" / _pred_name(cfg, "test"),
                                  [e.id for e in run.data["test"]], test_pred)
        memory = _gather_memory(run)
        metrics = write_metrics("finished")
        say(f"best dev acc {best['dev_acc']:.4f} (epoch {best['epoch']}); "
            f"{metrics['wall_time_s']:.0f} s; peak RSS {memory.get('peak_rss_gb')} GB; "
            f"results in {out}")
        return metrics
    finally:
        stop.restore()
        if run.own_group and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()          # no process tears gloo down while a peer still talks
            dist.destroy_process_group()


def _pred_name(cfg: TrainConfig, split: str) -> str:
    return f"{cfg.fine_tune_mode}-{cfg.task or 'custom'}-{split}-out.csv"


def _gather_memory(run: _Run) -> dict:
    """Peak memory and the optimizer state's bytes (of this process's shards, under FSDP) of
    every process: the largest peak, and each process's record."""
    from ._shards import local
    mine = _peak_memory(run.device)
    state = [local(v) for st in run.optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor)]
    mine["optimizer_state_mb"] = round(sum(t.numel() * t.element_size() for t in state) / 2**20, 3)
    if run.world == 1:
        return mine
    every: list = [None] * run.world
    torch.distributed.all_gather_object(every, mine)
    return {"peak_rss_gb": max(m["peak_rss_gb"] for m in every), "per_process": every}


# =========================================================================== the command line
def add_arguments(p) -> None:
    """The ``optimlab train`` options.  Defaults are ``argparse.SUPPRESS``: only the options
    given reach `TrainConfig` (whose defaults apply), so ``--resume`` can tell what was set."""
    S = argparse.SUPPRESS
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=list(TASKS), default=S,
                   help="a shipped data set: sst (SST-5, 5 labels; default) or cfimdb (2)")
    g.add_argument("--train-file", default=S, metavar="PATH",
                   help="your own TSV/CSV (header: sentence/text/review, sentiment/label, id) "
                        "instead of --task; needs --dev-file")
    g.add_argument("--dev-file", default=S, metavar="PATH")
    g.add_argument("--test-file", default=S, metavar="PATH", help="optional, labels not needed")
    g.add_argument("--num-labels", type=int, default=S, help="own files: default max label + 1")
    g.add_argument("--max-train-samples", type=int, default=S, metavar="N",
                   help="use the first N training examples only")
    g.add_argument("--max-eval-samples", type=int, default=S, metavar="N",
                   help="use the first N dev and test examples only")
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", default=S, metavar="DIR",
                   help="a Hugging Face BERT or GPT-2 directory (default: the embedded "
                        "MiniLM-L6-H384)")
    g.add_argument("--fine-tune-mode", choices=FINE_TUNE_MODES, default=S,
                   help=f"default {d.fine_tune_mode}")
    g.add_argument("--pooling", choices=("mean", "cls", "pooler", "last"), default=S,
                   help="default mean (BERT), last (GPT-2)")
    g.add_argument("--dropout", type=float, default=S, help=f"before the head (default {d.dropout})")
    g.add_argument("--max-length", type=int, default=S, metavar="TOKENS",
                   help="default 128 (sst, own files), 512 (cfimdb)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=S, metavar="NAME",
                   help=f"one of: {', '.join(list_optimizers())} (default adamw)")
    g.add_argument("--lr", type=float, default=S,
                   help="peak learning rate (default adamw: 1e-4 full-model, 1e-3 "
                        "last-linear-layer; see optimlab.train.default_lr)")
    g.add_argument("--weight-decay", type=float, default=S,
                   help=f"on weight matrices; biases and LayerNorms never (default "
                        f"{d.weight_decay}); with --wd-mode timescale: tau, in updates")
    g.add_argument("--wd-mode", choices=WD_MODES, default=S, help="default: the optimizer's")
    g.add_argument("--wd-form", choices=WD_FORMS, default=S,
                   help="how the shrink is rounded: fold (into the step) and compensated "
                        "keep the decay in low precision (default: the optimizer's)")
    g.add_argument("--wd-schedule", choices=WD_SCHEDULES, default=S,
                   help="a weight-decay multiplier over the updates, beside the lr schedule: "
                        "from 1 to --wd-final (default constant)")
    g.add_argument("--wd-final", type=float, default=S, metavar="M",
                   help="the multiplier at the end of a linear or cosine --wd-schedule "
                        "(e.g. 10 raises the decay tenfold, 0 turns it off)")
    g.add_argument("--sam", action="store_true", default=S, help="wrap the optimizer in SAM")
    g.add_argument("--rho", type=float, default=S, help=f"SAM radius (default {d.rho})")
    g.add_argument("--asam", action="store_true", default=S, help="adaptive SAM (with --sam)")
    g.add_argument("--max-grad-norm", type=_norm_or_none, default=S, metavar="NORM",
                   help=f"clip the gradient norm (default {d.max_grad_norm}; 0: no clipping)")
    g = p.add_argument_group("schedule and batches")
    g.add_argument("--epochs", type=int, default=S, help="default 3")
    g.add_argument("--batch-size", type=int, default=S,
                   help=f"examples per update over all processes (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=S, metavar="K",
                   help="split each process's share of a batch into K micro-batches: same "
                        "update, less memory (default 1 sst, 4 cfimdb)")
    g.add_argument("--warmup", type=float, default=S,
                   help=f"< 1: fraction of the updates, else updates (default {d.warmup})")
    g.add_argument("--schedule", choices=SCHEDULES, default=S,
                   help=f"after warmup (default {d.schedule})")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   default=S, help="plain shuffled batches")
    g.add_argument("--eval-batch-size", type=int, default=S, help=f"default {d.eval_batch_size}")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S, help=f"default {d.seed}")
    g.add_argument("--device", default=S, help="auto (default: cuda if available), cpu, cuda:N")
    g.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast")
    g.add_argument("--fsdp", action="store_true", default=S,
                   help="under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                        "instead of DDP; checkpoints reshard to any number of processes")
    g.add_argument("--out", default=S, metavar="DIR",
                   help="run directory (default runs/<task>-<optimizer>)")
    g.add_argument("--overwrite", action="store_true", default=S,
                   help="replace the run in --out")
    g.add_argument("--resume", default=S, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint")
    g.add_argument("--save-every", type=int, default=S, metavar="N",
                   help="also checkpoint every N updates (default: at epoch ends)")
    g.add_argument("--stop-after", type=int, default=S, metavar="N",
                   help="stop after N updates in all, with a checkpoint (resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bars")


def _norm_or_none(value: str):
    x = float(value)
    return None if x == 0 else x


def main(args) -> dict:
    """``optimlab train``: an argparse namespace from `add_arguments` -> metrics."""
    names = {f.name for f in fields(TrainConfig)} | {"resume"}
    options = {k: v for k, v in vars(args).items() if k in names}
    run_dir = options.pop("resume", None)
    if run_dir is not None:
        if "out" in options:
            raise ValueError("--resume DIR continues the run in DIR: drop --out")
        return resume(run_dir, handle_signals=True, **options)
    return train(TrainConfig(**options), handle_signals=True)


def exit_code(metrics: dict) -> int:
    """The command's exit status for a run's metrics: 0 finished (or stopped by --stop-after),
    128 + the signal's number when a signal stopped it (as a shell reports a killed job),
    `EXIT_DIVERGED` when it diverged."""
    if metrics["status"] == "diverged":
        return EXIT_DIVERGED
    if metrics["status"] == "stopped" and metrics.get("stop_signal"):
        return 128 + int(signal.Signals[metrics["stop_signal"]])
    return 0
