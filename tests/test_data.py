"""The shipped SST / CFIMDB files and the reader for users' own files."""

from __future__ import annotations

import collections
import re

import pytest

from optimlab.data import (SPLITS, TASKS, Record, load_file, load_split, num_labels,
                           split_file)

# (task, split) -> number of records, as documented
COUNTS = {
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test-student"): 2210,
    ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test-student"): 488,
}


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_shipped_split_counts_and_labels(task, split):
    records = load_split(task, split)
    assert len(records) == COUNTS[task, split]
    assert all(isinstance(r, Record) for r in records)
    assert all(r.text and r.text == r.text.strip() for r in records)
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{25}", i) for i in ids)
    labels = collections.Counter(r.label for r in records)
    if split == "test-student":
        assert set(labels) == {None}
    else:
        assert set(labels) == set(range(TASKS[task]))       # every class occurs, no other
    assert num_labels(task) == TASKS[task]


def test_shipped_files_are_package_data():
    f = split_file("sst", "train")
    assert f.is_file() and "optimlab" in str(f)
    with pytest.raises(ValueError, match="unknown task"):
        load_split("imdb", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split("sst", "test")


def test_sst_first_rows():
    dev = load_split("sst", "dev")
    assert dev[0] == Record("a7d575c9ed86ea9633660c67e",
                            "It 's a lovely film with lovely performances by Buy and Accorsi .", 3, 2)
    assert load_split("sst", "train")[-1] == Record("69121a33e2470c0b0b28cceee",
                                                    "In this case zero .", 1, 8545)


def test_cfimdb_quoted_rows_parse():
    train = load_split("cfimdb", "train")
    quoted = [r for r in train if r.text.startswith('"')]
    assert len(quoted) == 692                      # rows written with CSV quoting
    r = next(r for r in train if r.id == "40c20f9a5a33fc7289518b5fb")
    assert r.text.startswith('""" I vaguely remember Ben') and r.text.endswith('scarier now ! """')
    assert r.label in (0, 1)
    # No field swallowed its neighbours: no tab or newline inside a text.
    assert not any("\t" in r.text or "\n" in r.text for r in train)


def test_cfimdb_test_student_extra_quoting_removed():
    test = load_split("cfimdb", "test-student")
    quoted = [r for r in test if r.text.startswith('"')]
    assert len(quoted) == 196
    # after load_split, test text has the layout train text has
    assert all(r.text.startswith('""" ') and r.text.endswith(' """') for r in quoted)
    raw = load_file(split_file("cfimdb", "test-student"))          # as stored
    assert sum(r.text.startswith('" """"""') for r in raw) == 196
    assert [r.id for r in raw] == [r.id for r in test]


# --- users' own files -------------------------------------------------------------------------

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_user_tsv(tmp_path):
    p = write(tmp_path, "mine.tsv", "text\tlabel\ngreat film\t1\n  awful  \t0\n\nmeh, ok\t2.0\n")
    assert load_file(p) == [Record("0", "great film", 1, 2), Record("1", "awful", 0, 3),
                            Record("2", "meh, ok", 2, 5)]       # line 4 is blank


def test_user_csv_with_quotes_and_ids(tmp_path):
    p = write(tmp_path, "mine.csv",
              'ID,Review,Sentiment\n'
              'a,"Fine, really fine",1\n'
              'b,"She said ""wow"", twice",0\n'
              'c,"two\nlines",1\n')
    records = load_file(p, num_labels=2)
    assert records == [Record("a", "Fine, really fine", 1, 2),
                       Record("b", 'She said "wow", twice', 0, 3),
                       Record("c", "two\nlines", 1, 4)]          # it starts on line 4


def test_user_file_without_labels(tmp_path):
    p = write(tmp_path, "unlabeled.csv", "sentence\nfirst one\nsecond, with a comma\n")
    assert load_file(p) == [Record("0", "first one", None, 2),
                            Record("1", "second, with a comma", None, 3)]
    with pytest.raises(ValueError, match=r"unlabeled\.csv, line 1: no label column"):
        load_file(p, require_labels=True)


def test_user_file_delimiter_override(tmp_path):
    p = write(tmp_path, "semi.txt", "text;label\nhello;1\n")
    assert load_file(p, delimiter=";") == [Record("0", "hello", 1, 2)]


@pytest.mark.parametrize("name,content,line,message", [
    ("missing.tsv", "text\tlabel\ngood\t1\nbad row\n", 3, "expected 2 columns .* found 1"),
    ("extra.tsv", "text\tlabel\ngood\t1\nx\t1\t9\n", 3, "expected 2 columns .* found 3"),
    ("range.tsv", "text\tlabel\ngood\t1\nfine\t0\nodd\t7\n", 4, r"label 7 out of range \(0\.\.4\)"),
    ("negative.tsv", "text\tlabel\nbad\t-1\n", 2, "out of range"),
    ("word.tsv", "text\tlabel\ngood\tpositive\n", 2, "label 'positive' is not an integer"),
    ("frac.tsv", "text\tlabel\ngood\t1.5\n", 2, "not an integer"),
    ("nolabel.tsv", "text\tlabel\ngood\t\n", 2, "empty label"),
    ("empty.tsv", "text\tlabel\ngood\t1\n   \t1\n", 3, "empty text"),
    ("quote.csv", 'text,label\n"ok",1\n"unclosed,1\nnext,0\n', 3, "unclosed quote"),
])
def test_malformed_rows_name_file_and_line(tmp_path, name, content, line, message):
    p = write(tmp_path, name, content)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, line {line}: .*{message}"):
        load_file(p, num_labels=5)


def test_malformed_headers(tmp_path):
    with pytest.raises(ValueError, match=r"nohdr\.tsv, line 1: no text column"):
        load_file(write(tmp_path, "nohdr.tsv", "hello\t1\n"))
    with pytest.raises(ValueError, match=r"blank\.tsv: the file is empty"):
        load_file(write(tmp_path, "blank.tsv", ""))
    with pytest.raises(ValueError, match=r"only\.tsv: no rows"):
        load_file(write(tmp_path, "only.tsv", "text\tlabel\n"))
    p = tmp_path / "latin1.tsv"
    p.write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.tsv: not UTF-8"):
        load_file(p)


def test_line_numbers_count_multiline_fields(tmp_path):
    # A quoted field over two lines: the bad row after it is on line 5.
    p = write(tmp_path, "multi.csv", 'text,label\n"a\nb",1\nok,0\nbad,9\n')
    with pytest.raises(ValueError, match=r"multi\.csv, line 5: label 9"):
        load_file(p, num_labels=2)


def test_shipped_format_through_load_file(tmp_path):
    # The shipped layout (index column, tab-separated, .csv extension) is sniffed as TSV.
    p = write(tmp_path, "ids-like.csv", "\tid\tsentence\tsentiment\n0\tx1\t A film .\t4\n")
    assert load_file(p, num_labels=5) == [Record("x1", "A film .", 4, 2)]
    assert SPLITS == ("train", "dev", "test-student")
