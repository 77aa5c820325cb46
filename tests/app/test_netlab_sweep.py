"""`netlab sweep`: the grid and its bad input, the report writer on made-up results (no MPI), the
prediction's bookkeeping, and one real one-point sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_clean_failure
from pipeinfer_cpu.app.bench import BenchConfig
from pipeinfer_cpu.app.sweep import (PredictSetup, SweepGrid, SweepRequest, draft_token_cost, median_summary,
                                      predict_point, prediction_summary, sweep_point, write_sweep_report)
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.timings import Calibration, HostTiming


def test_the_grid_is_every_bandwidth_with_every_delay_and_mode():
    grid = SweepGrid.parse("1gbit, 100mbit", "0.1ms,5ms", "pipeline,pipeinfer")
    points = grid.points()
    assert len(points) == 8
    assert points[0] == ("1gbit", "0.1ms", "pipeline") and points[-1] == ("100mbit", "5ms", "pipeinfer")


@pytest.mark.parametrize("bandwidths, delays, modes, fragment", [
    ("", "1ms", "pipeline", "--bandwidth needs at least one value"),
    ("1gbit", " , ", "pipeline", "--delay needs at least one value"),
    ("1gbit", "1ms", "", "--modes needs at least one value"),
    ("1gbit", "1ms", "pipeline,warp", "unknown sweep mode 'warp'"),
    ("fast", "1ms", "pipeline", "bw 'fast' is not a number"),
    ("100mbps", "1ms", "pipeline", "'bps' spellings are ambiguous"),
    ("0mbit", "1ms", "pipeline", "bw must be above 0"),
    ("1gbit", "-1ms", "pipeline", "delay must be 0 or more"),
    ("1gbit", "5", "pipeline", "delay '5' is not a number"),
])
def test_bad_grids_are_one_clear_error(bandwidths, delays, modes, fragment):
    with pytest.raises(UserError, match=None) as caught:
        SweepGrid.parse(bandwidths, delays, modes)
    assert fragment in str(caught.value)


def _config(**changes) -> BenchConfig:
    values = dict(hostfile=Path("hosts/local.txt"), modes=("pipeline",), stages=2, threads=1, n_tokens=8,
                  prompts=("hi",))
    return BenchConfig(**{**values, **changes})


@pytest.mark.parametrize("changes, fragment", [
    (dict(repeats=0), "--repeats, --stages and --threads must be at least 1"),
    (dict(agreement=0.6, model=Path("m.gguf")), "not both"),
    (dict(modes="pipeline,speculative"), "need --draft or --agreement"),
    (dict(draft_calibration=Path("d.json")), "go with --predict"),
    (dict(modes="pipeinfer", agreement=0.6, calibration=Path("t.json")), "needs --draft-calibration"),
    (dict(modes="pipeinfer", draft=Path("d.gguf"), calibration=Path("t.json"), draft_calibration=Path("d.json")),
     "needs --acceptance"),
])
def test_bad_requests_are_refused_before_anything_runs(changes, fragment):
    grid = SweepGrid.parse("1gbit", "1ms", changes.pop("modes", "pipeline"))
    with pytest.raises(UserError) as caught:
        SweepRequest(grid, _config(modes=grid.modes), Path("out"), **changes)
    assert fragment in str(caught.value)


def test_the_command_refuses_bad_input_in_one_line(cli, tmp_path):
    assert_clean_failure(cli("netlab", "sweep", "--bandwidth", "", "--out", str(tmp_path)),
                         "--bandwidth needs at least one value")
    assert_clean_failure(cli("netlab", "sweep", "--delay", "1ms,2xs", "--modes", "pipeline", "--out", str(tmp_path)),
                         "bad link setting 'bw=1gbit,delay=2xs'")
    assert_clean_failure(cli("netlab", "sweep", "--modes", "pipeline,single", "--out", str(tmp_path)),
                         "unknown sweep mode 'single'")
    assert list(tmp_path.iterdir()) == []


def _summary(tok_s: float, accept: float | None = None) -> dict:
    return {"decode_tok_s": tok_s, "itl_mean_ms": 1e3 / tok_s, "itl_p50_ms": 1e3 / tok_s, "acceptance": accept,
            "decode_bytes_per_token": 4608.0}


def test_medians_over_repeats_and_the_prediction_error():
    repeats = [{"command": "pipeinfer-cpu run ...", "summary": _summary(s, a)} for s, a in ((10, 0.5), (30, None), (20, 0.7))]
    point = sweep_point("1gbit", "1ms", "pipeinfer", _config(), repeats, {"decode_tok_s": 23.0})
    assert point["median"]["decode_tok_s"] == 20 and point["median"]["decode_tok_s_range"] == [10, 30]
    assert point["median"]["acceptance"] == pytest.approx(0.6)  # the median of the repeats that have one
    assert point["error"] == pytest.approx(0.15)
    assert median_summary([])["decode_tok_s"] is None


def _fake_report(predicted: bool) -> dict:
    points = []
    for bandwidth, rate in (("1gbit", 1.0), ("10mbit", 0.5)):
        for delay, slow in (("0.1ms", 1.0), ("5ms", 0.8)):
            for mode, base in (("pipeline", 40.0), ("pipeinfer", 50.0)):
                tok_s = base * rate * slow
                repeats = [{"command": f"pipeinfer-cpu run --mode {mode} --link bw={bandwidth},delay={delay}",
                            "summary": _summary(tok_s + d, 0.5 if mode == "pipeinfer" else None)} for d in (-1, 0, 1)]
                prediction = {"decode_tok_s": tok_s * (1.1 if mode == "pipeline" else 1.3),
                              "bottleneck": "compute stage 0"} if predicted else None
                points.append(sweep_point(bandwidth, delay, mode, _config(), repeats, prediction))
    return {"title": "pipeinfer-cpu netlab sweep, SYNTHETIC bench pair (agreement 0.61 measured)",
            "machine": "test: 2 cores", "pair_label": "SYNTHETIC a=0.61", "points": points,
            "sweep_command": "pipeinfer-cpu netlab sweep --agreement 0.6 --out OUT"}


@pytest.mark.parametrize("predicted", [False, True])
def test_the_report_has_table_commands_and_plots(tmp_path, predicted):
    markdown = write_sweep_report(_fake_report(predicted), tmp_path)
    assert (tmp_path / "sweep.md").read_text() == markdown
    assert "SYNTHETIC" in markdown.splitlines()[0]
    rows = [line for line in markdown.splitlines() if line.startswith("| SYNTHETIC a=0.61 ")]
    assert len(rows) == 8 and "| 10mbit    | 5ms   | pipeinfer |" in rows[-1]
    assert "`pipeinfer-cpu netlab sweep --agreement 0.6 --out OUT`" in markdown
    assert ("PREDICTED tok/s" in markdown) == predicted
    if predicted:
        assert "max |error| 30% (pipeinfer, bw=1gbit,delay=0.1ms); 4 of 8 points within ±15% " \
               "(pipeline 4/4, pipeinfer 0/4)" in markdown
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert len(report["points"]) == 8 and report["points"][0]["median"]["decode_tok_s"] == 40.0
    for name in ("sweep-tokens.png", "sweep-heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_no_prediction_no_summary():
    assert prediction_summary(_fake_report(False)["points"]) is None


def test_predictions_slow_down_with_the_link():
    layer = ((1, 1e-3), (2, 1.2e-3), (4, 1.5e-3), (8, 2.2e-3))
    output = ((1, 2e-3), (2, 2.5e-3), (4, 3e-3), (8, 4e-3))
    target = Calibration("t.gguf", 12, (HostTiming("localhost", 1, layer, output),) * 2)
    draft = Calibration("d.gguf", 3, (HostTiming("localhost", 1, layer, output),))
    assert draft_token_cost(draft) == pytest.approx(5e-3)
    setup = PredictSetup(target, 576, 49152, 0.6, draft_token_cost(draft))
    config = _config(n_tokens=32)
    for mode in ("pipeline", "speculative", "pipeinfer"):
        fast = predict_point(setup, "bw=1gbit,delay=0.1ms", mode, config)
        slow = predict_point(setup, "bw=10mbit,delay=5ms", mode, config)
        assert 0 < slow["decode_tok_s"] < fast["decode_tok_s"]
        assert (fast["acceptance"] is None) == (mode == "pipeline")


def test_a_real_one_point_sweep(cli, tmp_path):
    out = tmp_path / "sweep"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n")
    done = cli("netlab", "sweep", "--bandwidth", "100mbit", "--delay", "1ms", "--modes", "pipeline", "--repeats", "1",
               "-n", "6", "--prompts-file", str(prompts), "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "sweep.json").read_text())
    [point] = report["points"]
    assert point["link"] == "bw=100mbit,delay=1ms" and point["median"]["decode_tok_s"] > 0
    assert point["median"]["decode_bytes_per_token"] > 0
    [prompt] = point["repeats"][0]["prompts"]
    assert prompt["n_generated"] == 6 and [stage["runs_computed"] > 0 for stage in prompt["stages"]][-2:] == [True] * 2
    assert "--link bw=100mbit,delay=1ms" in point["command"]
    assert "| 100mbit   | 1ms   | pipeline |" in (out / "sweep.md").read_text()
    assert (out / "sweep-tokens.png").is_file() and (out / "sweep-heatmap.png").is_file()
