"""Tests for common.files' resumable CSV tables (the atomic write is tested in test_logs.py)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd
import pytest

from common.files import (
    append_csv_rows,
    csv_header,
    drop_torn_line,
    keyed_csv_rows,
    read_csv_rows,
    write_csv_rows,
)

FIELDS = ["seed", "plan", "score", "note", "ok"]


def _row(seed: int, plan: str = "uniform", score: float = 0.1 + 0.2) -> dict:
    return {"seed": seed, "plan": plan, "score": score, "note": None, "ok": True}


def test_round_trip_header_once_and_cells_as_csv_writes_them(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    append_csv_rows(path, [_row(0)], FIELDS)
    append_csv_rows(path, [_row(1, 'a,"b"'), _row(2)], FIELDS)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, FIELDS)
    w.writeheader()
    w.writerows([_row(0), _row(1, 'a,"b"'), _row(2)])
    assert path.read_bytes() == buf.getvalue().encode()  # one header, \r\n, quoting and repr floats as csv's
    rows = read_csv_rows(path)
    assert [r["seed"] for r in rows] == ["0", "1", "2"] and rows[1]["plan"] == 'a,"b"'
    assert rows[0] == {"seed": "0", "plan": "uniform", "score": "0.30000000000000004", "note": "", "ok": "True"}
    assert csv_header(path) == FIELDS and read_csv_rows(tmp_path / "missing.csv") == []


def test_lineterminator_n_writes_what_pandas_writes(tmp_path):
    """benchmarks/latency.py and studies/train_step wrote with pandas: the same bytes with ``\\n``."""
    path = tmp_path / "t.csv"
    rows = [_row(0), {**_row(1), "score": np.float64(1.5), "note": "x, y"}]
    for r in rows:
        append_csv_rows(path, [r], FIELDS, lineterminator="\n")
    want = tmp_path / "want.csv"
    for r in rows:
        pd.DataFrame([r], columns=FIELDS).to_csv(want, mode="a", header=not want.is_file(), index=False)
    assert path.read_bytes() == want.read_bytes()


def test_resume_after_a_write_killed_midway(tmp_path):
    path = tmp_path / "t.csv"
    append_csv_rows(path, [_row(0), _row(1)], FIELDS)
    whole = path.read_bytes()
    path.write_bytes(whole + b"2,unifo")  # killed while writing row 2
    assert [r["seed"] for r in read_csv_rows(path)] == ["0", "1"]  # the torn line is no row
    assert path.read_bytes().endswith(b"2,unifo")  # reading changes nothing
    append_csv_rows(path, [_row(2)], FIELDS)  # starts on a line of its own
    assert [r["seed"] for r in read_csv_rows(path)] == ["0", "1", "2"]
    assert path.read_bytes() == whole + b"2,uniform,0.30000000000000004,,True\r\n"
    path.write_bytes(b"seed,pl")  # even the header torn: written again
    assert csv_header(path) == [] and drop_torn_line(path) and path.read_bytes() == b""
    append_csv_rows(path, [_row(3)], FIELDS)
    assert csv_header(path) == FIELDS and len(read_csv_rows(path)) == 1
    assert not drop_torn_line(path) and not drop_torn_line(tmp_path / "missing.csv")


def test_columns_that_differ_from_the_header_raise_naming_the_file(tmp_path):
    path = tmp_path / "t.csv"
    append_csv_rows(path, [_row(0)], FIELDS)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"t\.csv.*extra \['extra'\]"):
        append_csv_rows(path, [{**_row(1), "extra": 1}], FIELDS)
    with pytest.raises(ValueError, match=r"t\.csv.*missing \['ok'\]"):
        append_csv_rows(path, [{k: v for k, v in _row(1).items() if k != "ok"}], FIELDS)
    with pytest.raises(ValueError, match=r"t\.csv: its columns"):
        append_csv_rows(path, [dict(_row(1), more=2)], [*FIELDS, "more"])  # the file has other columns
    assert path.read_bytes() == before  # nothing written
    with pytest.raises(ValueError, match=r"u\.csv"):
        write_csv_rows(tmp_path / "u.csv", [{"seed": 1}], FIELDS)
    assert not (tmp_path / "u.csv").exists()


def test_write_csv_rows_replaces_the_whole_file(tmp_path):
    path = tmp_path / "t.csv"
    append_csv_rows(path, [_row(0), _row(1)], FIELDS)
    write_csv_rows(path, [_row(5)], FIELDS)
    assert [r["seed"] for r in read_csv_rows(path)] == ["5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary file left


def test_keyed_rows_skip_unreadable_ones_with_a_warning(tmp_path, capsys):
    path = tmp_path / "t.csv"
    append_csv_rows(path, [_row(0), _row(0, "energy"), {**_row(1), "seed": "x"}, _row(0, score=0.5)], FIELDS)
    done = keyed_csv_rows(path, lambda r: (int(r["seed"]), r["plan"]))
    assert set(done) == {(0, "uniform"), (0, "energy")} and done[0, "uniform"]["score"] == "0.5"  # the last wins
    assert f"warning: {path}:4: unreadable row skipped" in capsys.readouterr().err
