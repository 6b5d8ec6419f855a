"""Weight decay across conventions: `convert_weight_decay` and ``optimlab convert``.

"weight_decay=0.1" is a number in one convention; what it does is the shrink it makes at each
update t, theta <- theta - c_t theta.  Under an lr schedule with peak eta_0 and multiplier s_t
over T updates (K updates per epoch), each convention computes c_t from its number:

  =================  ===========================================  ==========================
  convention         its number                                   c_t
  =================  ===========================================  ==========================
  torch              lambda: torch.optim.AdamW's ``weight_decay``   eta_0 s_t lambda
  optax              lambda: optax.adamw's ``weight_decay``         eta_0 s_t lambda
  composer           lambda: Composer's DecoupledAdamW;             s_t lambda
                     optimlab ``wd_mode="independent"``
  timescale          tau, in updates (Wang & Aitchison 2024;        s_t / tau
                     optimlab ``wd_mode="timescale"``)
  timescale-epochs   tau, in epochs                                 s_t / (K tau)
  normalized         lambda_norm (Loshchilov & Hutter 2019,          s_t lambda_norm / sqrt(T)
                     appendix: lambda = lambda_norm sqrt(b / (B E))
                     for batch b, B training points, E epochs;
                     B E / b = T, the number of updates)
  lr_squared         lambda (PaLM; timm's corrected weight decay;   eta_0 s_t^2 lambda
                     optimlab ``wd_mode="lr_squared"``)
  absolute           lambda (labml's absolute decay; optimlab       lambda
                     ``wd_mode="absolute"``)
  =================  ===========================================  ==========================

The source's number gives c_t for every update.  Each other convention's number is the one
that gives the *same c_t at every update* where its c_t has the source's shape over the run
("exact": all of them but ``lr_squared`` and ``absolute`` while the schedule varies), else
the one that gives the *same total shrink* prod_t (1 - c_t) over the run ("same total"; the
weights end at the same scale from the decay alone, with the decay spent at other times).
"""

from __future__ import annotations

import dataclasses
import json
import math

from .loop import SCHEDULES, lr_multiplier, warmup_updates

__all__ = ["convert_weight_decay", "Conversion", "Setting", "CONVENTIONS"]

CONVENTIONS = ("torch", "optax", "composer", "timescale", "timescale-epochs", "normalized",
               "lr_squared", "absolute")

_HOW_TO_WRITE = {
    "torch": "torch.optim.AdamW(lr={lr:g}, weight_decay={v:.6g})",
    "optax": "optax.adamw(learning_rate=<the schedule, peak {lr:g}>, weight_decay={v:.6g})",
    "composer": "composer DecoupledAdamW(lr={lr:g}, weight_decay={v:.6g}); "
                "optimlab wd_mode='independent', weight_decay={v:.6g}",
    "timescale": "optimlab wd_mode='timescale', weight_decay={v:.6g} (tau in updates)",
    "timescale-epochs": "tau = {v:.6g} epochs = {v_updates:.6g} updates",
    "normalized": "lambda_norm = {v:.6g} (optimlab wd_mode='independent', "
                  "weight_decay={v_independent:.6g})",
    "lr_squared": "optimlab wd_mode='lr_squared', weight_decay={v:.6g}",
    "absolute": "optimlab wd_mode='absolute', weight_decay={v:.6g}",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One convention's weight decay for the recipe."""
    convention: str
    value: float        # the number in that convention (tau for the timescales)
    how: str            # "source", "exact" (the same c_t at every update) or "same total"
    first: float        # c_t at the first update
    peak: float         # the largest c_t
    last: float         # c_t at the last update
    total: float        # prod_t (1 - c_t): the weights' scale after the run, from decay alone
    write: str          # how to write it


@dataclasses.dataclass(frozen=True)
class Conversion:
    """`convert_weight_decay`'s answer: the recipe and every convention's setting for it."""
    lr: float
    steps: int
    schedule: str
    warmup: int
    steps_per_epoch: int | None
    source: Setting
    settings: tuple[Setting, ...]       # every convention, the source's included, in order

    def __getitem__(self, convention: str) -> Setting:
        for s in self.settings:
            if s.convention == convention:
                return s
        raise KeyError(f"{convention!r} is not among this conversion's conventions "
                       f"({', '.join(s.convention for s in self.settings)})")

    def table(self) -> str:
        """The settings as a text table (what ``optimlab convert`` prints)."""
        head = (f"weight decay for lr {self.lr:g}, {self.schedule} schedule, {self.steps} updates"
                f"{f', warmup {self.warmup}' if self.warmup else ''}"
                f"{f', {self.steps_per_epoch} updates per epoch' if self.steps_per_epoch else ''}"
                f"; from {self.source.convention} {self.source.value:g}")
        rows = [("convention", "value", "how", "shrink/update: first", "peak", "last",
                 "total over the run", "write it as")]
        for s in self.settings:
            rows.append((s.convention, f"{s.value:.6g}", s.how, f"{s.first:.3g}", f"{s.peak:.3g}",
                         f"{s.last:.3g}", f"{s.total:.6g}", s.write))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
                 for r in rows]
        return "\n".join([head, *lines])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _shape(convention: str, s: list[float], lr: float, steps: int,
           per_epoch: int | None) -> list[float]:
    """g_t with c_t = g_t * rate(value)."""
    if convention in ("torch", "optax"):
        return [lr * x for x in s]
    if convention in ("composer", "timescale"):
        return list(s)
    if convention == "timescale-epochs":
        return [x / per_epoch for x in s]
    if convention == "normalized":
        return [x / math.sqrt(steps) for x in s]
    if convention == "lr_squared":
        return [lr * x * x for x in s]
    return [1.0] * len(s)                                     # absolute


def _rate(convention: str, value: float) -> float:
    """The factor the number contributes to c_t (a timescale's is 1 / tau; 0: no decay)."""
    if convention.startswith("timescale"):
        return 1.0 / value if value else 0.0
    return value


def _value(convention: str, rate: float) -> float:
    return (1.0 / rate if rate else 0.0) if convention.startswith("timescale") else rate


def _log_total(c: list[float]) -> float:
    return sum(math.log1p(-x) for x in c)


def _match_total(g: list[float], target: float) -> float:
    """The rate r >= 0 with sum_t log(1 - r g_t) = ``target`` (bisection; the sum falls as r
    grows, down to -inf at r = 1 / max g)."""
    hi = 1.0 / max(g)
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if _log_total([mid * x for x in g]) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def convert_weight_decay(*, convention: str, weight_decay: float, lr: float, steps: int,
                         schedule: str = "constant", warmup: float = 0,
                         steps_per_epoch: int | None = None) -> Conversion:
    """Every convention's weight decay for one recipe (see the module docstring).

    Args:
        convention: the source's, one of `CONVENTIONS`.
        weight_decay: its number (tau for ``timescale`` in updates, ``timescale-epochs`` in
            epochs; lambda_norm for ``normalized``).
        lr: the peak learning rate eta_0.
        steps: T, the number of updates of the run.
        schedule: the lr schedule after warmup, ``constant``, ``linear`` or ``cosine`` (to 0
            at T), as `optimlab.loop.lr_multiplier` computes it.
        warmup: linear warmup, a fraction of T (< 1) or a number of updates.
        steps_per_epoch: K, for ``timescale-epochs`` (without it that row is left out, and
            it cannot be the source).

    Raises ValueError for a bad argument, and for a source whose decay reaches c_t >= 1 (it
    would zero or flip the weights: no other setting means the same).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"Invalid convention: {convention!r}; expected one of "
                         f"{', '.join(CONVENTIONS)}")
    for name, x in (("weight_decay", weight_decay), ("lr", lr), ("warmup", warmup)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"Invalid {name}: {x!r}; expected a finite number >= 0")
    if lr == 0:
        raise ValueError("Invalid lr: 0; expected the peak learning rate, > 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r}; expected a positive number of updates")
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid schedule: {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if warmup >= 1 and warmup != int(warmup):
        raise ValueError(f"Invalid warmup: {warmup!r}; expected a fraction (< 1) or a whole "
                         f"number of updates")
    if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or
                                        not isinstance(steps_per_epoch, int) or
                                        steps_per_epoch < 1):
        raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r}; expected a positive "
                         f"number of updates")
    if convention == "timescale-epochs" and steps_per_epoch is None:
        raise ValueError("convention 'timescale-epochs' needs steps_per_epoch (tau in epochs "
                         "is K tau updates)")
    if convention.startswith("timescale") and 0 < weight_decay < (
            1 if convention == "timescale" else 1 / steps_per_epoch):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; a timescale under one update "
                         f"shrinks the weights past zero (did you mean a lambda?)")
    w = warmup_updates(warmup, steps)
    s = [lr_multiplier(t, total=steps, warmup=w, schedule=schedule) for t in range(steps)]
    g_src = _shape(convention, s, lr, steps, steps_per_epoch)
    c = [x * _rate(convention, weight_decay) for x in g_src]
    if max(c) >= 1:
        raise ValueError(f"this recipe shrinks the weights by {max(c):.3g} of themselves in one "
                         f"update (>= 1: to zero or past it); no convention means the same")
    log_total = _log_total(c)
    settings = []
    for conv in CONVENTIONS:
        if conv == "timescale-epochs" and steps_per_epoch is None:
            continue
        g = _shape(conv, s, lr, steps, steps_per_epoch)
        ratios = [gt / gs for gt, gs in zip(g, g_src) if gs > 0]
        exact = conv == convention or (
            bool(ratios) and max(ratios) - min(ratios) <= 1e-12 * max(ratios))
        if conv == convention:
            rate = _rate(conv, weight_decay)
        elif exact:
            rate = sum(c) / sum(g)
        else:
            rate = _match_total(g, log_total) if log_total < 0 else 0.0
        if conv == convention:
            value = weight_decay
        else:
            value = _value(conv, rate)
        ct = [x * rate for x in g]
        v_updates = value * steps_per_epoch if steps_per_epoch else float("nan")
        v_independent = value / math.sqrt(steps)
        settings.append(Setting(
            convention=conv, value=value,
            how="source" if conv == convention else "exact" if exact else "same total",
            first=ct[0], peak=max(ct), last=ct[-1], total=math.exp(_log_total(ct)),
            write=_HOW_TO_WRITE[conv].format(lr=lr, v=value, v_updates=v_updates,
                                             v_independent=v_independent)))
    source = next(x for x in settings if x.convention == convention)
    return Conversion(lr=lr, steps=steps, schedule=schedule, warmup=w,
                      steps_per_epoch=steps_per_epoch, source=source, settings=tuple(settings))


def add_arguments(p) -> None:
    """The ``optimlab convert`` options."""
    p.add_argument("--from", dest="convention", choices=CONVENTIONS, required=True,
                   help="the convention of --weight-decay")
    p.add_argument("--weight-decay", type=float, required=True,
                   help="its number (tau for the timescales; lambda_norm for normalized)")
    p.add_argument("--lr", type=float, required=True, help="the peak learning rate")
    p.add_argument("--steps", type=int, required=True, help="updates in the run")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="the lr schedule after warmup (default constant)")
    p.add_argument("--warmup", type=float, default=0,
                   help="< 1: a fraction of the updates, else updates (default 0)")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="K",
                   help="updates per epoch (for tau in epochs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main_args(args) -> int:
    conv = convert_weight_decay(convention=args.convention, weight_decay=args.weight_decay,
                                lr=args.lr, steps=args.steps, schedule=args.schedule,
                                warmup=args.warmup, steps_per_epoch=args.steps_per_epoch)
    print(conv.to_json() if args.json else conv.table())
    return 0
