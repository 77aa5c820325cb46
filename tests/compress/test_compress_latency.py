"""Latency tables: channel grids, interpolation, pruned channel counts, the latency-bounded budget,
and the real onnxruntime measurement behind `compress latency-table` / `search --latency-table`."""

from __future__ import annotations

import json

import pytest
import torch

from compress.budget import fit_budget
from compress.errors import BudgetError, CompressError
from compress.latency import (ConvShape, LatencyTable, LayerTimes, channel_grid, conv_shapes, latency_predictor,
                              load_table, measure_table, pruned_channels)
from compress.models import ARCHITECTURES
from compress.models import build_model
from compress.prune import apply_policy, build_space
from compress.search import SearchConfig, budget_cost, check_budget
from compress.store import save_checkpoint
from compress_fixtures import cifar_root, cli, resnet20  # noqa: F401  (pytest fixtures)
from test_compress_bad_input import assert_one_line_error


def macs_timer(shape: ConvShape, cin: int, cout: int, threads: int = 1) -> float:
    """A stand-in CPU whose time is proportional to MACs (bilinear in the channel counts, so the
    table's interpolation reproduces it exactly)."""
    out_hw = (shape.height // shape.stride) * (shape.width // shape.stride)
    per_group_in = 1 if shape.depthwise else cin // shape.groups
    return 1e-6 * cout * per_group_in * shape.kernel ** 2 * out_hw


def flops_timer(shape: ConvShape, cin: int, cout: int, threads: int = 1) -> float:
    """MACs plus a per-16-output-channel block cost, so time differs from FLOPs as on a real CPU."""
    return macs_timer(shape, cin, cout) + 0.01 * -(-cout // 16)


def table_of(model, timer=flops_timer, multiple: int = 8, passes: int = 1, other_ms: float = 2.0,
             whole_by=None) -> LatencyTable:
    """A table of `model` by `timer`, the whole model taking `other_ms` more than its convs (as
    timed by `whole_by`, default `timer`)."""
    conv_ms = sum((whole_by or timer)(s, s.in_channels, s.out_channels) for s in conv_shapes(model).values())
    return measure_table(model, "resnet20", timer, whole_timer=lambda: conv_ms + other_ms,
                         channel_multiple=multiple, passes=passes)


def test_channel_grid_lists_every_reachable_count_or_spreads_them():
    assert channel_grid(64, 8) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert channel_grid(20, 8) == (8, 16, 20)
    assert channel_grid(3, 8) == (3,)
    wide = channel_grid(960, 8, max_points=9)
    assert len(wide) == 9 and wide[0] == 8 and wide[-1] == 960 and list(wide) == sorted(wide)


def test_layer_times_interpolate_bilinearly_and_clamp():
    times = LayerTimes((8, 16), (8, 24), ((1.0, 3.0), (2.0, 6.0)))
    assert times.at(8, 8) == 1.0 and times.at(16, 24) == 6.0
    assert times.at(12, 8) == pytest.approx(1.5)
    assert times.at(12, 16) == pytest.approx((2.0 + 4.0) / 2)
    assert times.at(4, 40) == 3.0  # outside the grid: its nearest end


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pruned_channels_match_the_physically_pruned_model(arch):
    model = build_model(arch).eval()
    space = build_space(model, channel_multiple=8)
    shapes = conv_shapes(model)
    keep = {g.root: 0.3 + 0.6 * (i % 3) / 2 for i, g in enumerate(space.groups)}
    predicted = pruned_channels(space, shapes, keep)
    pruned = apply_policy(model, space, keep)
    actual = {name: (m.in_channels, m.out_channels) for name, m in pruned.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    assert predicted == actual
    assert any(predicted[n] != (s.in_channels, s.out_channels) for n, s in shapes.items())


def test_prediction_is_the_timer_on_the_physically_pruned_model(resnet20):
    """A table measured on a coarser grid (multiples of 16) predicts a x8 policy by interpolation;
    with a time bilinear in the channel counts that is exact."""
    table = table_of(resnet20, macs_timer, multiple=16)
    assert table.other_ms == pytest.approx(2.0)
    space = build_space(resnet20, channel_multiple=8)
    # counts of 24 and 40: between the table's grid points (the smallest, 16, is never undershot)
    by_width = {16: (1.0, 1.0), 32: (0.75, 0.75), 64: (0.375, 0.625)}
    keep = {g.root: by_width[g.channels][i % 2] for i, g in enumerate(space.groups)}
    pruned_shapes = conv_shapes(apply_policy(resnet20, space, keep))
    assert any(s.out_channels % 16 for s in pruned_shapes.values())  # between grid points
    expected = 2.0 + sum(macs_timer(s, s.in_channels, s.out_channels) for s in pruned_shapes.values())
    assert latency_predictor(table, space)(keep) == pytest.approx(expected)
    restored = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert restored.shapes == table.shapes
    assert latency_predictor(restored, space)(keep) == pytest.approx(expected, rel=1e-3)


def test_table_keeps_the_median_sweep_and_never_lets_more_channels_cost_less(resnet20):
    sweep = {}

    def noisy(shape, cin, cout, threads):  # one sweep under load, one with a lucky dip, one quiet
        n = sweep[(shape, cin, cout)] = sweep.get((shape, cin, cout), 0) + 1
        return flops_timer(shape, cin, cout) * {1: 3.0, 2: 0.2, 3: 1.0}[n]

    assert table_of(resnet20, noisy, passes=3, whole_by=flops_timer).times == table_of(resnet20).times

    def dip(shape, cin, cout, threads):  # noise makes 16 output channels look cheaper than 8
        return flops_timer(shape, cin, cout) * (0.5 if cout == 16 else 1.0)

    times = table_of(resnet20, dip, whole_by=flops_timer).times["stages.1.1.conv1.0"]
    assert times.out_grid == (8, 16, 24, 32)
    for row in times.ms:
        assert list(row) == sorted(row)
    for col in zip(*times.ms):
        assert list(col) == sorted(col)


def test_latency_bound_meets_both_budgets(resnet20):
    space = build_space(resnet20, channel_multiple=8)
    table = table_of(resnet20)
    assert table.other_ms == pytest.approx(2.0)
    latency = latency_predictor(table, space)
    base_ms = latency({})
    flat = {g.root: 1.0 for g in space.groups}
    for speedup in (1.2, 1.6, 2.0):
        cfg = SearchConfig(target=0.6, min_speedup=speedup)
        check_budget(space, cfg, latency)
        keep = fit_budget(flat, budget_cost(space, cfg, latency), space.base_macs, cfg.target,
                          steps=space.steps())
        assert space.predict_macs(keep) <= 0.6 * space.base_macs
        assert base_ms / latency(keep) >= speedup
    with pytest.raises(BudgetError, match="speed-up 50x is unreachable"):
        check_budget(space, SearchConfig(target=0.6, min_speedup=50.0), latency)


def test_latency_table_and_bounded_search_from_the_cli(cli, cifar_root, tmp_path):
    """The real measurement with onnxruntime, then a search bounded by it."""
    table_path = tmp_path / "resnet20.json"
    result = cli("latency-table", "--arch", "resnet20", "--passes", "1", "--out", table_path)
    assert result.exit_code == 0, result.output + str(result.exception)
    table = LatencyTable.from_json(json.loads(table_path.read_text()))
    assert table.arch == "resnet20" and table.machine["onnxruntime"]
    assert all(ms >= 0 for t in table.times.values() for row in t.ms for ms in row)
    # a 3x3 conv with 64 -> 64 channels has 64x the MACs of 8 -> 8 at the same size
    last = table.times["stages.2.2.conv2.0"]
    assert last.at(64, 64) > last.at(8, 8)

    ckpt = tmp_path / "resnet20.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model("resnet20").eval(), "resnet20")
    out = tmp_path / "search"
    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--method", "random", "--episodes", "2",
                 "--holdout", "100", "--calib-batches", "1", "--limit-per-class", "20", "--device", "cpu",
                 "--latency-table", table_path, "--min-speedup", "1.3", "--out-dir", out, "--data", cifar_root)
    assert result.exit_code == 0, result.output + str(result.exception)
    searched = json.loads((out / "search_random.json").read_text())
    assert searched["predicted_speedup"] >= 1.3 and searched["min_speedup"] == 1.3
    assert searched["best_macs_ratio"] <= 0.5 * 1.01
    assert "predicted" in result.output

    # refused before the (missing) data are read
    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--latency-table", table_path,
                 "--min-speedup", "40", "--out-dir", tmp_path / "none", "--data", tmp_path / "no-data")
    assert_one_line_error(result, "unreachable")
    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--latency-table", table_path,
                 "--min-speedup", "1.3", "--channel-multiple", "4", "--out-dir", tmp_path / "none",
                 "--data", tmp_path / "no-data")
    assert_one_line_error(result, "multiples of 8")


def _write(path, data) -> None:
    path.write_text(json.dumps(data))


def test_bad_latency_tables(tmp_path, resnet20):  # noqa: F811
    table = table_of(resnet20)
    good = table.to_json()
    path = tmp_path / "t.json"
    shapes = conv_shapes(resnet20)
    _write(path, good)
    assert load_table(path, shapes, "resnet20", 8).arch == "resnet20"
    with pytest.raises(CompressError, match="measured for resnet20, not for resnet56"):
        load_table(path, conv_shapes(build_model("resnet56")), "resnet56", 8)
    with pytest.raises(CompressError, match="its conv layers or their shapes differ"):
        load_table(path, conv_shapes(build_model("resnet56")), "resnet20", 8)
    _write(path, [1, 2])
    with pytest.raises(CompressError, match="not a latency table"):
        load_table(path, shapes, "resnet20", 8)
    broken = {
        "no layers": {**good, "layers": {}},
        "layers not a mapping": {**good, "layers": [1]},
        "do not fill its channel grid": _edit(good, "ms", lambda ms: ms[:-1]),
        "must be increasing": _edit(good, "out_grid", lambda grid: list(reversed(grid))),
        "grid of strings": _edit(good, "in_grid", lambda grid: ["a"] * len(grid)),
        "finite": _edit(good, "ms", lambda ms: [[float("nan")] * len(row) for row in ms]),
        "other_ms": {**good, "other_ms": -1.0},
    }
    for what, data in broken.items():
        _write(path, data)
        with pytest.raises(CompressError, match="malformed"):
            load_table(path, shapes, "resnet20", 8)


def _edit(table: dict, key: str, change) -> dict:
    layer = "stages.1.1.conv1.0"
    layers = {**table["layers"], layer: {**table["layers"][layer], key: change(table["layers"][layer][key])}}
    return {**table, "layers": layers}


def test_bad_latency_table_commands(cli, tmp_path, resnet20, monkeypatch):  # noqa: F811
    ckpt = tmp_path / "resnet20.pt"
    save_checkpoint(ckpt, resnet20, "resnet20")
    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--min-speedup", "1.5", "--out-dir",
                 tmp_path / "s")
    assert result.exit_code == 2 and "go together" in result.output
    space = build_space(resnet20, channel_multiple=8)
    keep = {g.root: 0.5 for g in space.groups}
    save_checkpoint(tmp_path / "pruned.pt", apply_policy(resnet20, space, keep), "resnet20",
                    kept=space.kept_channels(keep))
    result = cli("latency-table", "--checkpoint", tmp_path / "pruned.pt", "--out", tmp_path / "x.json")
    assert_one_line_error(result, "already pruned")
    assert not (tmp_path / "x.json").exists()

    import compress.latency

    def must_not_run(*args, **kwargs):
        raise AssertionError("the table was measured before the output was checked")

    monkeypatch.setattr(compress.latency, "measure_model", must_not_run)
    (tmp_path / "a-file").write_text("")
    result = cli("latency-table", "--arch", "resnet20", "--out", tmp_path / "a-file" / "t.json")
    assert_one_line_error(result, "cannot write")
    result = cli("latency-table", "--arch", "resnet20", "--out", tmp_path / "new" / "deeper" / "t.json")
    assert isinstance(result.exception, AssertionError)  # got as far as measuring...
    assert not (tmp_path / "new").exists()  # ...and the probe left no folders behind


def test_reproduce_checks_the_latency_bound_before_any_work(cli, tmp_path, resnet20):  # noqa: F811
    path = tmp_path / "t.json"
    _write(path, table_of(resnet20).to_json())
    out = tmp_path / "run"
    common = ("--target", "0.5", "--out-dir", out, "--latency-table", path, "--data", tmp_path / "no-data")
    assert_one_line_error(cli("reproduce", "--arch", "resnet20", *common, "--min-speedup", "40"), "unreachable")
    assert_one_line_error(cli("reproduce", "--arch", "resnet56", *common, "--min-speedup", "1.2"),
                          "measured for resnet20")
    assert not out.exists()
    # a reachable bound gets as far as the (missing) data
    assert_one_line_error(cli("reproduce", "--arch", "resnet20", *common, "--min-speedup", "1.2"), "no-data")
    (tmp_path / "a-file").write_text("")
    assert_one_line_error(cli("reproduce", "--arch", "resnet20", "--target", "0.5", "--out-dir",
                              tmp_path / "a-file" / "run", "--data", tmp_path / "no-data"), "cannot write")
