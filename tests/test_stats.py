"""Tests of pipeinfer_cpu.stats: derived metrics, JSON, atomic writes, markdown tables."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeinfer_cpu.stats import RunStats, StageStats, markdown_table, write_json

TIMES = (0.10, 0.20, 0.35, 0.45, 0.75)  # ITL: 0.10, 0.15, 0.10, 0.30


def _stage(**changes: object) -> StageStats:
    base = StageStats(
        rank=1, host="node-a", layers=(0, 15), compute_s=0.4, wall_s=1.0, peak_rss_bytes=123_456_789
    )
    return dataclasses.replace(base, **changes)


def _run(times: tuple[float, ...] = TIMES, **changes: object) -> RunStats:
    base = RunStats(
        mode="pipeline",
        n_prompt=12,
        n_generated=len(times),
        prefill_s=0.0123,
        ttft_s=times[0] if times else 0.0,
        token_times_s=times,
        bytes_sent=11_520,
        stages=(
            _stage(),
            _stage(rank=2, host="node-b", layers=(15, 30), compute_s=0.7, runs_cancelled_during=2),
        ),
        head_peak_rss_bytes=99_000_000,
    )
    return dataclasses.replace(base, **changes)


# --- StageStats --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compute_s, wall_s, idle",
    [(0.4, 1.0, 0.6), (0.0, 2.0, 1.0), (1.2, 1.0, 0.0), (0.5, 0.0, 0.0), (-0.1, 1.0, 1.0)],
)
def test_idle_fraction_is_clamped(compute_s: float, wall_s: float, idle: float) -> None:
    assert _stage(compute_s=compute_s, wall_s=wall_s).idle_fraction == pytest.approx(idle)


# --- derived RunStats metrics ------------------------------------------------------------------


def test_itl_and_percentiles_by_hand() -> None:
    stats = _run()
    assert stats.itl_s == pytest.approx((0.10, 0.15, 0.10, 0.30))
    assert stats.itl_mean_s == pytest.approx(0.1625)
    assert stats.itl_p50_s == pytest.approx(0.125)  # between 0.10 and 0.15
    assert stats.itl_p95_s == pytest.approx(0.15 + 0.85 * 0.15)  # rank 2.85 of 0..3


def test_percentiles_match_numpy_linear() -> None:
    times = tuple(np.cumsum(np.random.default_rng(3).exponential(0.01, size=101)).tolist())
    stats = _run(times)
    itl = np.diff(times)
    assert stats.itl_p50_s == pytest.approx(np.percentile(itl, 50))
    assert stats.itl_p95_s == pytest.approx(np.percentile(itl, 95))
    assert stats.itl_mean_s == pytest.approx(itl.mean())


def test_decode_tokens_per_s_excludes_the_first_token() -> None:
    assert _run().decode_tokens_per_s == pytest.approx(4 / 0.65)


def test_zero_tokens_has_no_rates() -> None:
    stats = _run(())
    assert stats.itl_s == ()
    assert stats.itl_mean_s is None and stats.itl_p50_s is None and stats.itl_p95_s is None
    assert stats.decode_tokens_per_s is None
    assert stats.bytes_per_token is None
    assert "0 tokens" in stats.summary_line() and "ITL n/a" in stats.summary_line()


def test_one_token_has_no_itl_but_bytes_per_token() -> None:
    stats = _run((0.2,), bytes_sent=500)
    assert stats.itl_s == ()
    assert stats.itl_p95_s is None
    assert stats.decode_tokens_per_s is None
    assert stats.bytes_per_token == 500


def test_simultaneous_tokens_have_no_rate() -> None:
    stats = _run((0.3, 0.3, 0.3))
    assert stats.itl_s == (0.0, 0.0)
    assert stats.itl_p50_s == 0.0
    assert stats.decode_tokens_per_s is None


def test_acceptance_rate_and_bytes_per_token() -> None:
    assert _run().acceptance_rate is None
    assert _run(drafted=40, accepted=25).acceptance_rate == pytest.approx(0.625)
    assert _run().bytes_per_token == pytest.approx(11_520 / 5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_generated": 4}, "token times"),
        ({"token_times_s": (0.1, 0.3, 0.2, 0.4, 0.5)}, "non-decreasing"),
        ({"drafted": 3, "accepted": 4}, "accepted <= drafted"),
        ({"accepted": -1}, "accepted <= drafted"),
    ],
)
def test_inconsistent_stats_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(**changes)


# --- JSON ----------------------------------------------------------------------------------------


def test_json_round_trip_preserves_everything() -> None:
    stats = _run(drafted=40, accepted=25, runs_launched=30, runs_cancelled=7)
    data = json.loads(json.dumps(stats.to_json_dict(), allow_nan=False))
    assert RunStats.from_json_dict(data) == stats


def test_json_dict_has_raw_and_derived_fields() -> None:
    data = _run(drafted=10, accepted=6).to_json_dict()
    assert data["token_times_s"] == list(TIMES)
    assert data["itl_p50_s"] == pytest.approx(0.125)
    assert data["decode_tokens_per_s"] == pytest.approx(4 / 0.65)
    assert data["acceptance_rate"] == pytest.approx(0.6)
    assert data["stages"][0]["layers"] == [0, 15]
    assert data["stages"][0]["idle_fraction"] == pytest.approx(0.6)
    assert data["stages"][1]["runs_cancelled_during"] == 2
    assert isinstance(data["stages"], list)


def test_json_dict_turns_numpy_values_into_plain_ones() -> None:
    stage = _stage(peak_rss_bytes=np.int64(7), wall_s=np.float32(2.0))
    data = _run(bytes_sent=np.int64(11_520), stages=(stage,)).to_json_dict()
    assert json.loads(json.dumps(data))["bytes_sent"] == 11_520
    assert type(data["stages"][0]["peak_rss_bytes"]) is int
    assert type(data["stages"][0]["wall_s"]) is float


def test_json_of_empty_run_uses_null() -> None:
    text = json.dumps(_run(()).to_json_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["itl_mean_s"] is None and data["decode_tokens_per_s"] is None and data["itl_s"] == []


# --- summary line -------------------------------------------------------------------------------


def test_summary_line_plain_pipeline() -> None:
    line = _run().summary_line()
    assert line.startswith("pipeline: 5 tokens, prefill 12.3 ms, TTFT 100.0 ms")
    assert "ITL mean 162.50 ms p50 125.00 p95 277.50" in line
    assert "6.2 tok/s" in line
    assert "2.3 KB/token" in line
    assert "accept" not in line and "runs" not in line


def test_summary_line_speculative() -> None:
    line = _run(mode="pipeinfer", drafted=40, accepted=25, runs_launched=30, runs_cancelled=7).summary_line()
    assert line.startswith("pipeinfer: ")
    assert "accept 62% (25/40)" in line
    assert "runs 30 (cancelled 7)" in line


# --- atomic write -------------------------------------------------------------------------------


def test_write_json_single_and_list(tmp_path: Path) -> None:
    single, both = tmp_path / "one.json", tmp_path / "both.json"
    write_json(_run(), single)
    write_json([_run(), _run(mode="single")], both)
    assert RunStats.from_json_dict(json.loads(single.read_text())) == _run()
    assert [d["mode"] for d in json.loads(both.read_text())] == ["pipeline", "single"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.json", "one.json"]


def test_write_json_accepts_mappings_with_stats_inside(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    write_json({"machine": "2-core", "runs": [_run()]}, path)
    data = json.loads(path.read_text())
    assert data["machine"] == "2-core"
    assert data["runs"][0]["n_generated"] == 5


def test_write_json_bad_value_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text("old")
    with pytest.raises(ValueError):
        write_json({"x": float("nan")}, path)
    with pytest.raises(TypeError):
        write_json({"x": object()}, path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_write_json_failed_replace_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stats.json"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_json(_run(), path)
    assert list(tmp_path.iterdir()) == []


# --- markdown tables ----------------------------------------------------------------------------


def test_markdown_table_layout_and_alignment() -> None:
    rows = [
        {"mode": "single", "tok/s": 184.937, "itl_ms": 5.4123, "bytes": 0},
        {"mode": "pipeinfer", "tok/s": 1234.5, "itl_ms": 0.004567, "bytes": 2304},
    ]
    table = markdown_table(rows, ["mode", "tok/s", "itl_ms", "bytes"])
    assert table.splitlines() == [
        "| mode      | tok/s |  itl_ms | bytes |",
        "| --------- | ----: | ------: | ----: |",
        "| single    | 184.9 |    5.41 |     0 |",
        "| pipeinfer |  1234 | 0.00457 |  2304 |",
    ]
    assert table.endswith("|\n")


def test_markdown_table_missing_none_and_pipes() -> None:
    rows = [{"name": "a|b", "x": 1.0}, {"name": None}]
    assert markdown_table(rows, ["name", "x", "absent"]).splitlines() == [
        "| name |    x | absent |",
        "| ---- | ---: | ------ |",
        "| a\\|b | 1.00 |        |",
        "|      |      |        |",
    ]


def test_markdown_table_number_precision() -> None:
    rows = [{"v": v} for v in (0.0, 0.123456, 3.14159, 123.456, 98765.4, float("nan"), True)]
    cells = [line.strip("| ").strip() for line in markdown_table(rows, ["v"]).splitlines()[2:]]
    assert cells == ["0.00", "0.123", "3.14", "123.5", "98765", "nan", "True"]


def test_markdown_table_needs_columns() -> None:
    with pytest.raises(ValueError, match="column"):
        markdown_table([{"a": 1}], [])
    assert markdown_table([], ["a"]).splitlines() == ["| a   |", "| --- |"]
