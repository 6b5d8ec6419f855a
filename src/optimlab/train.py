"""Fine-tune a pretrained transformer on sentiment data: ``optimlab train``.

    optimlab train                                   # MiniLM-L6 on SST-5 with AdamW, all defaults
    optimlab train --task cfimdb --optimizer radam --sam --rho 0.05 --out runs/cfimdb-radam-sam
    optimlab train --resume runs/cfimdb-radam-sam    # continue from the last checkpoint
    torchrun --nproc_per_node=2 -m optimlab.cli train ...   # data-parallel (gloo/nccl)

From Python: ``metrics = train(TrainConfig(task="sst", lr=5e-5))`` or ``resume("runs/sst-adamw")``.

The loop, top to bottom (`_run`): processes and device -> data (tokenized once) -> model ->
optimizer (`create_optimizer`, wrapped in `SAM` with ``sam=True``) -> schedule (linear warmup,
then linear/cosine decay, a ``LambdaLR``) -> for each epoch: length-grouped batches in a seeded
order, one `accumulate_and_step` per batch (every optimizer, SAM or not: micro-batches are
weighted by their share of the examples, so accumulation and DDP give the global-batch
gradient) -> dev accuracy -> best weights -> checkpoint -> at the end, predictions of the best
model and ``metrics.json``.

What a run directory holds (``--out``, default ``runs/<task>-<optimizer>``):

    checkpoint.pt           the last state: model, optimizer, scheduler, RNG of every process,
                            epoch and step within it, the epoch's batch order, history, config
                            (written to a temporary file, then renamed: a crash mid-save leaves
                            the previous checkpoint intact)
    best_model.safetensors  the weights of the epoch with the best dev accuracy
    predictions/<mode>-<task>-dev-out.csv, ...-test-out.csv
                            the CS224N format: a header ``id \\t Predicted_Sentiment`` and one
                            ``<id> , <label>`` line per example
    metrics.json            config, per-epoch loss / dev accuracy / time / throughput, best
                            epoch, wall time, peak memory, package versions, git revision

Batches.  ``batch_size`` is the number of examples per optimizer update over *all* processes
and micro-batches; ``grad_accum`` splits each process's share into that many micro-batches
(less memory, the same update); ``torchrun --nproc_per_node=N`` splits each batch over N
processes (the same update again).  With ``group_by_length`` (default) each epoch shuffles the
examples, sorts chunks of 50 batches by length, cuts them into batches and shuffles the
batches: little padding (about 1.8x faster on SST), still a random order.  Resuming is exact:
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
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._common import WD_MODES
from .data import TASKS, load_file, load_split
from .registry import get_spec, list_optimizers, param_groups_weight_decay
from .sam import SAM, accumulate_and_step

__all__ = ["TrainConfig", "train", "resume", "SCHEDULES", "default_lr", "length_grouped_batches",
           "lr_multiplier", "atomic_save", "write_predictions"]

SCHEDULES = ("linear", "cosine", "constant")
FINE_TUNE_MODES = ("full-model", "last-linear-layer")
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.safetensors"
METRICS = "metrics.json"

# Per-task defaults (None in TrainConfig means "take it from here").  SST sentences are short;
# CFIMDB reviews are long (median ~300 tokens), so they get 512 tokens and micro-batches of 8.
TASK_DEFAULTS = {
    "sst":    dict(max_length=128, grad_accum=1, epochs=2),
    "cfimdb": dict(max_length=512, grad_accum=4, epochs=3),
    None:     dict(max_length=128, grad_accum=1, epochs=3),       # your own files
}

# Learning rates: adamw's full-model rate was tuned on the embedded MiniLM-L6 (SST-5 dev, 2
# epochs: 5e-5 -> 0.479 (3 epochs: 0.481), 1e-4 -> 0.501; a small model likes a larger rate:
# for BERT-base use 2e-5..5e-5); the others are starting points, not tuned here.
_LR_FULL = {"adam": 1e-4, "adamw": 1e-4, "amsgrad": 1e-4, "radam": 1e-4, "adafactor": 1e-4,
            "sgd": 1e-2, "sgdw": 1e-2, "adagrad": 1e-3, "rmsprop": 1e-5}
_LR_HEAD = {"sgd": 0.1, "sgdw": 0.1, "adagrad": 1e-2, "rmsprop": 1e-3}


def default_lr(optimizer: str, fine_tune_mode: str) -> float:
    """The learning rate ``optimlab train`` uses when ``--lr`` is not given."""
    if fine_tune_mode == "last-linear-layer":
        return _LR_HEAD.get(optimizer, 1e-3)
    return _LR_FULL.get(optimizer, 5e-5)


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
    wd_mode: str | None = None           # l2 / decoupled / independent; None: the optimizer's
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
                if path is not None and not os.path.isfile(path):
                    raise FileNotFoundError(f"{opt} {path!r} does not exist: give a TSV/CSV file "
                                            f"with a header (sentence/text/review, "
                                            f"sentiment/label, id)")
        c.optimizer = c.optimizer.lower()
        if c.optimizer not in list_optimizers():
            raise ValueError(f"unknown optimizer {c.optimizer!r}; choose from "
                             f"{', '.join(list_optimizers())}")
        _choice("--fine-tune-mode", c.fine_tune_mode, FINE_TUNE_MODES)
        _choice("--schedule", c.schedule, SCHEDULES)
        if c.wd_mode is not None:
            _choice("--wd-mode", c.wd_mode, WD_MODES)
        if c.model_dir is not None:
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


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """One epoch's batches (lists of example indices), every example once.

    A random permutation; with ``group_by_length``, chunks of ``mega`` batches are each sorted
    by length (longest first), cut into batches, and the batches shuffled, so a batch holds
    examples of similar length but the order of batches is random (as transformers'
    LengthGroupedSampler, plus the shuffle of batches).  Only the last batch may be smaller.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        chunk = batch_size * mega
        perm = [i for s in range(0, len(perm), chunk)
                for i in sorted(perm[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length:
        last = batches.pop() if len(batches[-1]) < batch_size else None
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        if last is not None:
            batches.append(last)
    return batches


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 20) + epoch)


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """The factor on the peak lr for update ``step`` (0-based): linear warmup over ``warmup``
    updates ((step + 1) / (warmup + 1), as nanoGPT: the first update does move), then
    ``linear`` (to 0 at ``total``), ``cosine`` (half a cosine to 0) or ``constant``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class _Schedule:
    """`lr_multiplier` as a picklable callable for LambdaLR."""

    def __init__(self, total: int, warmup: int, schedule: str):
        self.total, self.warmup, self.schedule = total, warmup, schedule

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, total=self.total, warmup=self.warmup, schedule=self.schedule)


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
            device: torch.device, autocast: Callable, rank: int = 0, world: int = 1) -> list[int]:
    """Predicted labels of ``examples``, in their order.  Batches are formed by length (less
    padding); under DDP each process predicts every world-th batch and all gather."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    preds: dict[int, int] = {}
    for b in batches[rank::world]:
        batch = _collate([examples[i] for i in b], pad_id, device)
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"])
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
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write ``path`` through a temporary file in the same directory and ``os.replace``: a
    reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):          # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` via a temporary file and an atomic rename."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save as st_save
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = st_save(state, metadata=metadata)
    _atomic_write(path, lambda f: f.write(data))


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))


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


def _environment() -> dict:
    from importlib import metadata
    versions = {"python": sys.version.split()[0]}
    for pkg in ("optimlab", "torch", "tokenizers", "safetensors", "tqdm", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[2]
    git = {"revision": None, "dirty": None}
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            git["revision"] = rev.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=10)
            git["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git": git, "platform": sys.platform,
            "torch_threads": torch.get_num_threads()}


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
        self._old = {}
        if enabled and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
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
    ckpt = Path(cfg.out) / CHECKPOINT
    if ckpt.exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already holds a run ({CHECKPOINT}): continue it with "
                              f"--resume {cfg.out}, replace it with --overwrite, or choose "
                              f"another --out")
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
    names = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in state["config"].items() if k in names}
    cfg = replace(TrainConfig(**saved), out=str(run_dir), **overrides).resolved()
    return _run(cfg, state, handle_signals=handle_signals, log=log)


# =========================================================================== the loop
def _run(cfg: TrainConfig, state: dict | None, *, handle_signals: bool,
         log: Callable[[str], None] | None) -> dict:
    start_time = time.perf_counter()
    tqdm = _require("tqdm", "the training progress bars").tqdm
    _require("tokenizers", "tokenizing the training data")
    _require("safetensors", "saving the best model")
    from .models import build_classifier, load_tokenizer
    from .models._checkpoint import default_model_dir

    # ---- processes and device (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)
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
    is_main = rank == 0
    say = (log or (lambda s: tqdm.write(s))) if is_main else (lambda s: None)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16
                else contextlib.nullcontext)
    out = Path(cfg.out)
    stop = _StopFlag(handle_signals)
    try:
        # ---- data: read, tokenize once (lengths known for grouping), cap if asked
        model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
        tokenizer = load_tokenizer(model_dir, max_length=cfg.max_length)
        if cfg.task is not None:
            splits = {"train": load_split(cfg.task, "train"), "dev": load_split(cfg.task, "dev"),
                      "test": load_split(cfg.task, "test-student")}
            num_labels = TASKS[cfg.task]
        else:
            splits = {"train": load_file(cfg.train_file, require_labels=True,
                                         num_labels=cfg.num_labels),
                      "dev": load_file(cfg.dev_file, require_labels=True,
                                       num_labels=cfg.num_labels)}
            if cfg.test_file is not None:
                splits["test"] = load_file(cfg.test_file, num_labels=cfg.num_labels)
            num_labels = cfg.num_labels or 1 + max(r.label for s in ("train", "dev")
                                                   for r in splits[s])
        limits = {"train": cfg.max_train_samples, "dev": cfg.max_eval_samples,
                  "test": cfg.max_eval_samples}
        data: dict[str, list[Example]] = {}
        for name, records in splits.items():
            records = records[:limits[name]] if limits[name] else records
            encodings = tokenizer.encode_batch([r.text for r in records])
            data[name] = [Example(r.id, e.ids, r.label) for r, e in zip(records, encodings)]
        train_set, lengths = data["train"], [len(e.ids) for e in data["train"]]
        if len(train_set) < world:
            raise ValueError(f"{len(train_set)} training examples cannot feed {world} processes")

        # ---- model: pretrained encoder + a fresh head, seeded
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = build_classifier(model_dir, num_labels=num_labels, pooling=cfg.pooling,
                                 dropout=cfg.dropout, fine_tune_mode=cfg.fine_tune_mode)
        if model.pooling != "pooler" and getattr(model.encoder, "pooler", None) is not None:
            model.encoder.pooler.requires_grad_(False)      # unused: no gradient, no updates
        model.to(device)
        pad_id = model.pad_token_id
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

        # ---- optimizer: weight decay on weight matrices only; SAM wraps the same groups
        spec = get_spec(cfg.optimizer)
        options = dict(spec.defaults)
        if cfg.wd_mode is not None:
            options["wd_mode"] = cfg.wd_mode
        if cfg.optimizer == "adafactor":      # let --lr and the schedule set the step size
            options.update(relative_step=False, scale_parameter=False)
        groups = param_groups_weight_decay(model, cfg.weight_decay)
        if cfg.sam:
            optimizer = SAM(groups, spec.cls, rho=cfg.rho, adaptive=cfg.asam, lr=cfg.lr,
                            **options)
        else:
            optimizer = spec.cls(groups, lr=cfg.lr, **options)
        n_decay = sum(p.numel() for g in groups if g["weight_decay"] for p in g["params"])

        # ---- schedule: warmup, then decay, one multiplier per update
        updates_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        if world > 1 and len(train_set) % cfg.batch_size and \
                len(train_set) % cfg.batch_size < world:
            updates_per_epoch -= 1           # a last batch smaller than the world is dropped
        total_updates = updates_per_epoch * cfg.epochs
        warmup = (round(cfg.warmup * total_updates) if cfg.warmup < 1 else int(cfg.warmup))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _Schedule(total_updates, warmup, cfg.schedule))

        ddp_model = model
        if world > 1:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)

        # ---- where we are: a fresh start, or the checkpoint's position
        epoch, step_in_epoch, global_step = 0, 0, 0
        history: list[dict] = []
        best = {"epoch": None, "dev_acc": -1.0}
        plan: list[list[int]] | None = None
        partial = None                   # inside an epoch: its loss sum, examples, seconds
        previous_wall = 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ranks = state["ranks"]
            if len(ranks) != world:
                say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                    f"{world}; dropout masks will differ from an uninterrupted run")
            _set_rng_state(ranks[rank % len(ranks)]["rng"], device)
            pos = state["position"]
            epoch, step_in_epoch, global_step = pos["epoch"], pos["step_in_epoch"], pos["step"]
            plan = pos["batches"]
            mine = ranks[rank % len(ranks)]["loss_sum"]
            partial = {"loss_sum": mine or [0.0, 0.0], "seen": pos["seen"],
                       "seconds": pos["seconds"]}
            history, best = state["history"], state["best"]
            previous_wall = state.get("wall_time_s", 0.0)
        elif is_main:
            out.mkdir(parents=True, exist_ok=True)
            for stale in (out / CHECKPOINT, out / BEST_MODEL, out / METRICS):
                stale.unlink(missing_ok=True)          # --overwrite
        if world > 1:
            dist.barrier()
        environment = _environment() if is_main else {}

        def checkpoint(partial: dict | None = None):
            """The whole state after the update just done; ``partial``: the epoch's loss sum,
            examples and seconds so far, when inside an epoch.  All processes take part."""
            mine = {"rng": _rng_state(device), "loss_sum": partial["loss_sum"] if partial else None}
            per_rank = [mine]
            if world > 1:
                per_rank = [None] * world
                dist.all_gather_object(per_rank, mine)
            if is_main:
                atomic_save({
                    "format": "optimlab.train/1", "config": asdict(cfg),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "ranks": per_rank,
                    "position": {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                 "step": global_step, "batches": plan,
                                 "seen": partial["seen"] if partial else 0,
                                 "seconds": partial["seconds"] if partial else 0.0},
                    "history": history, "best": best, "world_size": world,
                    "wall_time_s": previous_wall + time.perf_counter() - start_time,
                }, out / CHECKPOINT)

        def write_metrics(status: str) -> dict:
            metrics = {
                "status": status, "config": asdict(cfg), "task": cfg.task,
                "num_labels": num_labels, "examples": {k: len(v) for k, v in data.items()},
                "parameters": {"total": n_total, "trained": n_train, "decayed": n_decay},
                "world_size": world, "device": str(device),
                "updates": {"per_epoch": updates_per_epoch, "total": total_updates,
                            "warmup": warmup, "done": global_step},
                "epochs": history, "best_epoch": best["epoch"], "best_dev_acc": best["dev_acc"],
                "wall_time_s": round(previous_wall + time.perf_counter() - start_time, 2),
                "memory": memory, **environment,
            }
            if is_main:
                _atomic_write(out / METRICS, lambda f: f.write(
                    (json.dumps(metrics, indent=2) + "\n").encode("utf-8")))
            return metrics

        say(f"optimlab train: {cfg.task or cfg.train_file} ({len(train_set)} train / "
            f"{len(data['dev'])} dev), {model.model_type} from {model_dir} "
            f"({cfg.fine_tune_mode}, {n_train:,} of {n_total:,} parameters trained), "
            f"{cfg.optimizer}{' + SAM' if cfg.sam else ''} lr {cfg.lr:g}, {cfg.epochs} epochs x "
            f"{updates_per_epoch} updates of {cfg.batch_size} ({world} process(es) x "
            f"{cfg.grad_accum} micro-batches), warmup {warmup} + {cfg.schedule}, "
            f"{device} -> {out}")
        if state is not None:
            say(f"resuming at epoch {epoch + 1}, update {step_in_epoch} of the epoch "
                f"({global_step} in all)")

        # ---- the epochs
        stopped = False
        memory: dict = {}
        ddp_model.train()
        while epoch < cfg.epochs and not stopped:
            if plan is None:
                plan = length_grouped_batches(lengths, cfg.batch_size,
                                              _epoch_generator(cfg.seed, epoch),
                                              cfg.group_by_length)
                if world > 1 and len(plan[-1]) < world:
                    plan.pop()
            partial = partial or {"loss_sum": [0.0, 0.0], "seen": 0, "seconds": 0.0}
            loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64)   # sum loss*n, n
            seen, tick = partial["seen"], time.perf_counter() - partial["seconds"]
            partial = None
            bar = tqdm(total=len(plan), initial=step_in_epoch, desc=f"epoch {epoch + 1}/"
                       f"{cfg.epochs}", unit="step", disable=not (is_main and cfg.progress),
                       dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
            while step_in_epoch < len(plan):
                batch = sorted(plan[step_in_epoch], key=lambda i: -lengths[i])
                mine = batch[rank::world]                       # this process's share
                micro = [_collate([train_set[i] for i in part], pad_id, device)
                         for part in _split(mine, cfg.grad_accum)]
                loss = accumulate_and_step(ddp_model, optimizer, micro, _loss_fn,
                                           max_grad_norm=cfg.max_grad_norm,
                                           autocast=torch.bfloat16 if cfg.bf16 else None)
                scheduler.step()
                step_in_epoch += 1
                global_step += 1
                loss_sum += torch.tensor([loss * len(mine), len(mine)], dtype=torch.float64)
                seen += len(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum[0].item() / max(1.0, loss_sum[1].item()):.4f}",
                                ex_per_s=f"{seen / (time.perf_counter() - tick):.1f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                stop_now = stop.requested or global_step == cfg.stop_after
                if world > 1:                                   # every process stops together
                    flag = torch.tensor([float(stop_now)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = bool(flag.item())
                if stop_now:
                    stopped = True
                    break
                if cfg.save_every and global_step % cfg.save_every == 0 and \
                        step_in_epoch < len(plan):
                    checkpoint({"loss_sum": loss_sum.tolist(), "seen": seen,
                                "seconds": time.perf_counter() - tick})
            bar.close()
            if step_in_epoch < len(plan):       # stopped inside the epoch: save and leave
                checkpoint({"loss_sum": loss_sum.tolist(), "seen": seen,
                            "seconds": time.perf_counter() - tick})
                break
            train_seconds = time.perf_counter() - tick
            if world > 1:
                dist.all_reduce(loss_sum)

            # ---- evaluate on dev; keep the best weights and their dev predictions
            tick = time.perf_counter()
            dev_pred = predict(model, data["dev"], batch_size=cfg.eval_batch_size, pad_id=pad_id,
                               device=device, autocast=autocast, rank=rank, world=world)
            dev_acc = sum(p == e.label for p, e in zip(dev_pred, data["dev"])) / len(data["dev"])
            record = {"epoch": epoch + 1, "train_loss": loss_sum[0].item() / loss_sum[1].item(),
                      "dev_acc": dev_acc, "train_seconds": round(train_seconds, 2),
                      "eval_seconds": round(time.perf_counter() - tick, 2),
                      "train_examples_per_s": round(seen / train_seconds, 2),
                      "lr_end": scheduler.get_last_lr()[0], "updates": global_step}
            history.append(record)
            if dev_acc > best["dev_acc"]:
                best = {"epoch": epoch + 1, "dev_acc": dev_acc}
                if is_main:
                    _save_weights(model, out / BEST_MODEL, {"epoch": str(epoch + 1),
                                                            "dev_acc": f"{dev_acc:.6f}"})
                    write_predictions(out / "predictions" / _pred_name(cfg, "dev"),
                                      [e.id for e in data["dev"]], dev_pred)
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, dev acc "
                f"{dev_acc:.4f}{' (best)' if best['epoch'] == epoch + 1 else ''}, "
                f"{train_seconds:.0f} s ({record['train_examples_per_s']:.1f} ex/s), eval "
                f"{record['eval_seconds']:.0f} s")
            epoch, step_in_epoch, plan = epoch + 1, 0, None
            checkpoint()
            memory = _gather_memory(device, world)
            write_metrics("running" if epoch < cfg.epochs else "evaluating")

        # ---- the end: test predictions of the best model, metrics
        memory = _gather_memory(device, world)
        if stopped and epoch < cfg.epochs:
            say(f"stopped after update {global_step}; continue with: optimlab train --resume "
                f"{out}")
            return write_metrics("stopped")
        if world > 1:
            dist.barrier()                                  # the best weights are written
        _load_weights(model, out / BEST_MODEL)
        if "test" in data:
            test_pred = predict(model, data["test"], batch_size=cfg.eval_batch_size,
                                pad_id=pad_id, device=device, autocast=autocast, rank=rank,
                                world=world)
            if is_main:
                write_predictions(out / "predictions" / _pred_name(cfg, "test"),
                                  [e.id for e in data["test"]], test_pred)
        memory = _gather_memory(device, world)
        metrics = write_metrics("finished")
        say(f"best dev acc {best['dev_acc']:.4f} (epoch {best['epoch']}); "
            f"{metrics['wall_time_s']:.0f} s; peak RSS {memory.get('peak_rss_gb')} GB; "
            f"results in {out}")
        return metrics
    finally:
        stop.restore()
        if own_group and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()          # no process tears gloo down while a peer still talks
            dist.destroy_process_group()


def _pred_name(cfg: TrainConfig, split: str) -> str:
    return f"{cfg.fine_tune_mode}-{cfg.task or 'custom'}-{split}-out.csv"


def _gather_memory(device: torch.device, world: int) -> dict:
    mine = _peak_memory(device)
    if world == 1:
        return mine
    every: list = [None] * world
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
                   help=f"on weight matrices; biases and LayerNorms never (default {d.weight_decay})")
    g.add_argument("--wd-mode", choices=WD_MODES, default=S, help="default: the optimizer's")
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
