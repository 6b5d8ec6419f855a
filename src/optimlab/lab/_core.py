"""The lab's machinery shared by every experiment: cached cells, progress, the report.

An experiment is a set of *cells* (one training run, one measurement), each a pure function of
its parameters.  `Lab.run_cells` computes the cells that are not on disk yet, with a progress
bar, and writes each one as ``<out>/cells/<name>-<hash>.json`` the moment it finishes (through a
temporary file and a rename: a crash leaves a whole cell or none).  An interrupted experiment
rerun with the same options therefore skips its finished cells; changing an option that a cell
depends on changes the hash, so stale cells are never reused (options that only choose which
cells run, such as a grid or the number of seeds, are not part of the hash: a wider grid or more
seeds reuse the cells already there).

`Lab.write_report` writes ``<out>/report.md`` (conclusion, tables, figures, then the config,
seeds, cell counts, wall time and versions) and ``<out>/results.json`` (the same numbers, for
machines).  Every number a report shows is computed from the cells of the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .._run import atomic_write, environment

__all__ = ["Lab", "Cell", "mode_config", "parse_grid", "fmt", "mean", "std", "how_measured"]


def how_measured(doc: str) -> str:
    """The "What is measured." part of an experiment module's docstring, as one paragraph (the
    report's **How.**)."""
    return doc.split("What is measured.")[1].strip().replace("\n", " ")


def mode_config(opts, quick: dict, full: dict) -> dict:
    """An experiment's config: its ``quick`` or ``full`` options as ``opts.quick`` says,
    ``--seeds`` overriding theirs, and ``quick`` itself."""
    cfg = dict(quick if opts.quick else full)
    if opts.seeds is not None:
        cfg["seeds"] = opts.seeds
    cfg["quick"] = opts.quick
    return cfg


@dataclass
class Cell:
    """One unit of work: ``name`` (readable, part of the file name) and ``params`` (JSON-able,
    everything the result depends on besides the experiment's config)."""

    name: str
    params: dict


@dataclass
class Lab:
    """The run of one experiment: where it writes, its config, and what it did."""

    experiment: str
    out: Path
    config: dict                               # the experiment's options (in the report)
    progress: bool = True
    computed: int = 0                          # cells computed by this run
    cached: int = 0                            # cells found on disk
    cell_seconds: float = 0.0                  # compute time of every cell, cached ones too
    start: float = field(default_factory=time.perf_counter)
    #: config keys that only choose *which* cells run (grids, number of seeds): left out of the
    #: cell hash, so extending a grid or adding seeds reuses the cells already computed
    grid_keys: tuple = ()

    def __post_init__(self):
        self.out = Path(self.out)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ cells
    def cell_path(self, cell: Cell) -> Path:
        shared = {k: v for k, v in self.config.items() if k not in self.grid_keys}
        key = json.dumps({"experiment": self.experiment, "config": shared,
                          "params": cell.params}, sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
        return self.out / "cells" / f"{cell.name}-{digest}.json"

    def run_cells(self, cells: Sequence[Cell], compute: Callable[[dict], dict],
                  desc: str | None = None, threads: int | None = 1) -> list[dict]:
        """The result of every cell, in order: read from disk if there, else ``compute(params)``
        and written atomically at once.  A progress bar counts the cells.  ``threads``: torch
        threads while computing (1 by default: the cells are small models, for which more
        threads cost far more in synchronisation than they gain, above all on a busy CPU)."""
        import torch
        from tqdm.auto import tqdm
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return self._run_cells(cells, compute, desc, tqdm)
        finally:
            torch.set_num_threads(old_threads)

    def _read_cell(self, path: Path, cell: Cell) -> dict | None:
        """A cached cell's result, or None when the file is not what a run of this cell writes
        (truncated, not JSON, another cell's or experiment's, no result): computed again."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        params = json.loads(json.dumps(cell.params, default=_jsonable))
        if not isinstance(data, dict) or data.get("experiment") != self.experiment or \
                data.get("name") != cell.name or data.get("params") != params or \
                not isinstance(data.get("result"), dict) or "seconds" not in data["result"]:
            return None
        return data["result"]

    def _run_cells(self, cells, compute, desc, tqdm) -> list[dict]:
        names = [c.name for c in cells]
        if len(set(names)) != len(names):
            raise RuntimeError(f"{self.experiment}: duplicate cell names")
        results: list[dict | None] = [None] * len(cells)
        todo = []
        for i, cell in enumerate(cells):
            path = self.cell_path(cell)
            if path.is_file():
                cached = self._read_cell(path, cell)
                if cached is not None:
                    results[i] = cached
                    self.cached += 1
                    continue
            todo.append(i)
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell",
                   desc=desc or self.experiment, disable=not self.progress, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        for i in todo:
            cell = cells[i]
            bar.set_postfix_str(cell.name, refresh=False)
            tick = time.perf_counter()
            with warnings.catch_warnings():          # skipped non-finite steps are results here
                warnings.simplefilter("ignore", RuntimeWarning)
                result = compute(cell.params)
            result = dict(result, seconds=round(time.perf_counter() - tick, 3))
            text = json.dumps({"experiment": self.experiment, "name": cell.name,
                               "params": cell.params, "result": result},
                              indent=1, default=_jsonable) + "\n"
            atomic_write(self.cell_path(cell), lambda f: f.write(text.encode("utf-8")))
            results[i] = json.loads(text)["result"]     # exactly what a rerun will read
            self.computed += 1
            bar.update(1)
        bar.close()
        self.cell_seconds += sum(r.get("seconds", 0.0) for r in results)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ output
    def figure_path(self, name: str) -> Path:
        return self.out / name

    @property
    def wall_time(self) -> float:
        return time.perf_counter() - self.start

    def write_report(self, *, title: str, claim: str, conclusion: str, sections: Iterable[str],
                     figures: Sequence[tuple[str, str]], numbers: dict, how: str) -> Path:
        """``report.md`` and ``results.json``.  ``claim``: what the seed says (the question);
        ``conclusion``: the paragraph computed from ``numbers``; ``how``: what was measured and
        how; ``figures``: (file name in ``out``, caption)."""
        env = environment()
        wall = round(self.wall_time, 1)
        argv = "optimlab " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in (
            "optimlab", "cli.py") else None
        lines = [f"# {title}", "", f"**Claim tested.** {claim}", "",
                 f"**Conclusion (computed from this run).** {conclusion}", "",
                 f"**How.** {how}", ""]
        for caption_file, caption in figures:
            lines += [f"![{caption}]({caption_file})", "", f"*{caption}*", ""]
        for s in sections:
            lines += [s.rstrip(), ""]
        lines += ["## Run", "",
                  f"- experiment: `{self.experiment}`" + (f", command: `{argv}`" if argv else ""),
                  f"- cells: {self.computed + self.cached} ({self.computed} computed by this "
                  f"run, {self.cached} read from `cells/`)",
                  f"- seeds: {', '.join(str(k) for k in range(self.config['seeds']))} "
                  f"(each seeds the initialisation and the batch order)"
                  if isinstance(self.config.get("seeds"), int) else "- seeds: see config",
                  f"- wall time of this run: {wall} s; compute time of all its cells, "
                  f"cached ones included: {self.cell_seconds:.1f} s",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()
                                               if v),
                  f"- git: {env['git']['revision'] or 'unknown'}"
                  + (" (dirty)" if env["git"].get("dirty") else ""),
                  f"- platform: {env['platform']}, torch threads {env['torch_threads']}",
                  "", "### Config", "", "```json", json.dumps(self.config, indent=2,
                                                                default=_jsonable), "```", ""]
        text = "\n".join(lines)
        atomic_write(self.out / "report.md", lambda f: f.write(text.encode("utf-8")))
        results = {"experiment": self.experiment, "config": self.config, "numbers": numbers,
                   "conclusion": conclusion, "cells": {"computed": self.computed,
                                                       "cached": self.cached},
                   "wall_time_s": wall, **env}
        blob = json.dumps(results, indent=2, default=_jsonable) + "\n"
        atomic_write(self.out / "results.json", lambda f: f.write(blob.encode("utf-8")))
        return self.out / "report.md"


def _jsonable(x: Any):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serializable: {type(x).__name__}")


# ---------------------------------------------------------------------- small helpers
def parse_grid(option: str, text: str | Sequence[float], *, minimum: float | None = None,
               positive: bool = False, at_least: int = 2) -> list[float]:
    """``"1e-3,3e-3,1e-2"`` -> sorted floats; a ValueError naming ``option`` when a value is
    not a finite number, is out of range, repeats, or there are fewer than ``at_least``."""
    if isinstance(text, str):
        parts = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [float(t) for t in parts]
        except ValueError:
            raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    else:
        values = [float(v) for v in text]
    if len(values) < at_least:
        raise ValueError(f"{option} needs at least {at_least} values, got {len(values)}")
    for v in values:
        if not math.isfinite(v) or (positive and v <= 0) or (minimum is not None and v < minimum):
            need = "> 0" if positive else f">= {minimum}"
            raise ValueError(f"{option}: every value must be a finite number {need}, got {v:g}")
    if len(set(values)) != len(values):
        raise ValueError(f"{option}: repeated values in {text!r}")
    return sorted(values)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number as the reports print it (the tests compare these strings with the cells)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def mean(xs: Sequence[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
