"""The sentiment data sets (shipped with the package) and a reader for your own files.

Shipped (the CS224N default project's files, in this folder):

====================  =======  =====  ============  ==========================================
task                  labels   train  dev           test-student (no labels)
====================  =======  =====  ============  ==========================================
``sst``  (SST-5)      0..4     8,544  1,101         2,210
``cfimdb`` (reviews)  0..1     1,707    245           488
====================  =======  =====  ============  ==========================================

The files are tab-separated despite their ``.csv`` extension, with a leading index column (two
in the test-student files) and a header (``id``, ``sentence``, ``sentiment``).  CFIMDB reviews
that contain quotes are written with CSV quoting inside that layout, so they are read with a tab
delimiter and standard CSV quoting (``"`` quotes a field, ``""`` is a literal quote).  The
test-student files were saved once more than train/dev, which wrapped each quoted review in one
more layer of CSV quoting; :func:`load_split` removes that layer so that test text looks like
train and dev text (``load_file`` on those files does not).

Every record is ``Record(id, text, label, line)``: ``text`` is stripped of surrounding
whitespace and otherwise unchanged (no lower-casing: that is the tokenizer's business); ``label``
is an ``int`` or ``None`` for unlabeled files; ``line`` is the line of the file it starts on.  A malformed row raises ``ValueError`` naming the file, the line
and what is wrong.

Your own file (:func:`load_file`): a header row is required.  Columns are found by header name,
case-insensitively: the text in ``sentence``, ``text`` or ``review``; the label (optional) in
``sentiment`` or ``label``, an integer >= 0 (``3`` or ``3.0``); the id (optional) in ``id``,
else the record's 0-based position.  The delimiter is a tab for ``.tsv``/``.tab`` files, else a
tab if the header line contains one, else a comma; pass ``delimiter=`` to override.
"""

from __future__ import annotations

import csv
import io
import os
import re
from importlib import resources
from typing import Iterable, NamedTuple

__all__ = ["Record", "TASKS", "SPLITS", "load_split", "load_file", "num_labels", "split_file"]

#: task name -> number of classes
TASKS: dict[str, int] = {"sst": 5, "cfimdb": 2}
SPLITS: tuple[str, ...] = ("train", "dev", "test-student")

TEXT_COLUMNS = ("sentence", "text", "review")
LABEL_COLUMNS = ("sentiment", "label")
ID_COLUMNS = ("id",)


class Record(NamedTuple):
    id: str
    text: str
    label: int | None
    line: int | None = None     # the line of its file the record starts on (errors name it)


def num_labels(task: str) -> int:
    """Number of classes of a shipped task (``sst``: 5, ``cfimdb``: 2)."""
    return TASKS[_task(task)]


def split_file(task: str, split: str):
    """The shipped file of ``task``/``split`` (an ``importlib.resources`` Traversable)."""
    task, split = _task(task), _split(split)
    return resources.files(__name__).joinpath(f"ids-{task}-{split}.csv")


def load_split(task: str, split: str) -> list[Record]:
    """Records of a shipped split: ``task`` in ``sst``, ``cfimdb``; ``split`` in ``train``,
    ``dev``, ``test-student`` (labels ``None``)."""
    task, split = _task(task), _split(split)
    f = split_file(task, split)
    with f.open("r", encoding="utf-8", newline="") as fp:
        return _read(fp, name=str(f), delimiter="\t", num_labels=TASKS[task],
                      require_labels=split != "test-student",
                      unquote_once=split == "test-student")


def load_file(path: str | os.PathLike, *, num_labels: int | None = None,
              delimiter: str | None = None, require_labels: bool = False) -> list[Record]:
    """Records of your own TSV/CSV file (see the module docstring for the columns).

    ``num_labels``: labels must lie in ``0 .. num_labels - 1`` (default: any integer >= 0).
    ``require_labels``: fail if the file has no label column.
    """
    path = os.fspath(path)
    if delimiter is None:
        delimiter = _sniff_delimiter(path)
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fp:
            return _read(fp, name=path, delimiter=delimiter, num_labels=num_labels,
                         require_labels=require_labels, unquote_once=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


# --------------------------------------------------------------------------------------------

def _task(task: str) -> str:
    t = str(task).lower()
    if t not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return t


def _split(split: str) -> str:
    s = str(split).lower()
    if s not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return s


def _sniff_delimiter(path: str) -> str:
    if path.lower().endswith((".tsv", ".tab")):
        return "\t"
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fp:
            first = fp.readline()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    return "\t"        # a single column: a tab cannot split the text by accident


# A whole field that is itself one CSV-quoted value: "...", with inner quotes doubled.
_QUOTED = re.compile(r'"((?:[^"]|"")*)"', re.S)


def _find(header: list[str], names: Iterable[str]) -> int | None:
    folded = [h.strip().lower() for h in header]
    for name in names:
        if name in folded:
            return folded.index(name)
    return None


def _parse_label(raw: str) -> int:
    s = raw.strip()
    if not s:
        raise ValueError("empty label")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"label {raw!r} is not an integer") from None
    if not f.is_integer():
        raise ValueError(f"label {raw!r} is not an integer")
    return int(f)


def _read(fp: io.TextIOBase, *, name: str, delimiter: str, num_labels: int | None,
          require_labels: bool, unquote_once: bool) -> list[Record]:
    reader = csv.reader(fp, delimiter=delimiter, quotechar='"', doublequote=True, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{name}: the file is empty (a header row is expected)") from None
    except csv.Error as e:
        raise ValueError(f"{name}, line 1: {e}") from None

    text_col = _find(header, TEXT_COLUMNS)
    label_col = _find(header, LABEL_COLUMNS)
    id_col = _find(header, ID_COLUMNS)
    if text_col is None:
        raise ValueError(
            f"{name}, line 1: no text column: the header must name one of "
            f"{', '.join(TEXT_COLUMNS)} (found {header!r}; delimiter {delimiter!r})")
    if label_col is None and require_labels:
        raise ValueError(f"{name}, line 1: no label column: the header must name one of "
                         f"{', '.join(LABEL_COLUMNS)} (found {header!r})")
    width = len(header)

    records: list[Record] = []
    while True:
        line = reader.line_num + 1          # the line this record starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{name}, line {line}: {e}") from None
        if not row:                          # a blank line
            continue
        where = f"{name}, line {line}"
        if len(row) != width:
            hint = ""
            if any("\n" in cell for cell in row):
                hint = " (an unclosed quote runs over several lines?)"
            raise ValueError(f"{where}: expected {width} columns ({delimiter!r}-separated: "
                             f"{', '.join(repr(h) for h in header)}) but found {len(row)}{hint}")
        text = row[text_col]
        if unquote_once:
            m = _QUOTED.fullmatch(text)
            if m:
                text = m.group(1).replace('""', '"')
        text = text.strip()
        if not text:
            raise ValueError(f"{where}: empty text in column {header[text_col]!r}")
        label = None
        if label_col is not None:
            try:
                label = _parse_label(row[label_col])
            except ValueError as e:
                raise ValueError(f"{where}: {e} in column {header[label_col]!r}") from None
            if label < 0 or (num_labels is not None and label >= num_labels):
                allowed = f"0..{num_labels - 1}" if num_labels is not None else ">= 0"
                raise ValueError(f"{where}: label {label} out of range ({allowed})")
        rid = row[id_col].strip() if id_col is not None else str(len(records))
        records.append(Record(rid, text, label, line))
    if not records:
        raise ValueError(f"{name}: no rows after the header")
    return records
