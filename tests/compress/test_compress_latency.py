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
from compress.models import build_model
from compress.prune import apply_policy, build_space
from compress.search import SearchConfig, budget_cost
from compress.store import save_checkpoint
from compress_fixtures import cifar_root, cli, resnet20  # noqa: F401  (pytest fixtures)
from test_compress_bad_input import assert_one_line_error


def flops_timer(shape: ConvShape, cin: int, cout: int, threads: int) -> float:
    """A stand-in CPU whose time is proportional to MACs, plus a per-output-block cost that makes
    it differ from FLOPs (as a real CPU does)."""
    out_hw = (shape.height // shape.stride) * (shape.width // shape.stride)
    per_group_in = 1 if shape.depthwise else cin // shape.groups
    return 1e-6 * cout * per_group_in * shape.kernel ** 2 * out_hw + 0.01 * -(-cout // 16)


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


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2"])
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


def test_table_predicts_the_timer_on_pruned_shapes(resnet20):
    shapes = conv_shapes(resnet20)
    conv_ms = sum(flops_timer(s, s.in_channels, s.out_channels, 1) for s in shapes.values())
    table = measure_table(resnet20, "resnet20", flops_timer, whole_timer=lambda: conv_ms + 2.0, passes=2)
    assert table.other_ms == pytest.approx(2.0)
    assert table.predict_ms({}) == pytest.approx(conv_ms + 2.0)
    space = build_space(resnet20, channel_multiple=8)
    keep = {g.root: 0.5 for g in space.groups}
    expected = table.other_ms + sum(flops_timer(shapes[n], cin, cout, 1)
                                    for n, (cin, cout) in pruned_channels(space, shapes, keep).items())
    assert latency_predictor(table, space)(keep) == pytest.approx(expected)
    restored = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert restored.shapes == table.shapes
    assert latency_predictor(restored, space)(keep) == pytest.approx(expected, rel=1e-4)


def test_table_keeps_the_fastest_sweep(resnet20):
    seen = set()

    def noisy(shape, cin, cout, threads):  # the first sweep runs under background load
        slow = (shape, cin, cout) not in seen
        seen.add((shape, cin, cout))
        return flops_timer(shape, cin, cout, threads) * (3.0 if slow else 1.0)

    table = measure_table(resnet20, "resnet20", noisy, whole_timer=lambda: 10.0, passes=2)
    quiet = measure_table(resnet20, "resnet20", flops_timer, whole_timer=lambda: 10.0, passes=1)
    assert table.times == quiet.times


def test_latency_bound_meets_both_budgets(resnet20):
    space = build_space(resnet20, channel_multiple=8)
    table = measure_table(resnet20, "resnet20", flops_timer, whole_timer=lambda: 10.0, passes=1)
    latency = latency_predictor(table, space)
    base_ms = latency({})
    flat = {g.root: 1.0 for g in space.groups}
    for speedup in (1.2, 1.6, 2.0):
        cfg = SearchConfig(target=0.6, min_speedup=speedup)
        keep = fit_budget(flat, budget_cost(space, cfg, latency), space.base_macs, cfg.target,
                          steps=space.steps())
        assert space.predict_macs(keep) <= 0.6 * space.base_macs
        assert base_ms / latency(keep) >= speedup
    with pytest.raises(BudgetError, match="speed-up 50x is unreachable"):
        budget_cost(space, SearchConfig(target=0.6, min_speedup=50.0), latency)


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
    assert searched["predicted_speedup"] >= 1.3 and searched["best_macs_ratio"] <= 0.5 * 1.01
    assert "predicted" in result.output

    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--latency-table", table_path,
                 "--min-speedup", "40", "--out-dir", tmp_path / "none", "--data", cifar_root)
    assert_one_line_error(result, "unreachable")
    assert not (tmp_path / "none").exists()


def test_bad_latency_tables(cli, tmp_path, resnet20):  # noqa: F811
    table = measure_table(resnet20, "resnet20", flops_timer, whole_timer=lambda: 10.0, passes=1)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_json()))
    with pytest.raises(CompressError, match="measured for resnet20"):
        load_table(path, conv_shapes(build_model("resnet56")), "resnet56")
    path.write_text(json.dumps({"format": "compress-latency-table-v1", "layers": {}}))
    with pytest.raises(CompressError, match="malformed"):
        load_table(path, conv_shapes(resnet20), "resnet20")
    truncated = table.to_json()
    truncated["layers"]["stem.0"]["ms"] = truncated["layers"]["stem.0"]["ms"][:-1]
    path.write_text(json.dumps(truncated))
    with pytest.raises(CompressError, match="do not fill its channel grid"):
        load_table(path, conv_shapes(resnet20), "resnet20")
    path.write_text("[1, 2]")
    with pytest.raises(CompressError, match="not a latency table"):
        load_table(path, conv_shapes(resnet20), "resnet20")

    ckpt = tmp_path / "resnet20.pt"
    save_checkpoint(ckpt, resnet20, "resnet20")
    result = cli("search", "--checkpoint", ckpt, "--target", "0.5", "--min-speedup", "1.5", "--out-dir",
                 tmp_path / "s")
    assert result.exit_code == 2 and "go together" in result.output
    space = build_space(resnet20, channel_multiple=8)
    pruned = apply_policy(resnet20, space, {g.root: 0.5 for g in space.groups})
    save_checkpoint(tmp_path / "pruned.pt", pruned, "resnet20", kept=space.kept_channels(
        {g.root: 0.5 for g in space.groups}))
    result = cli("latency-table", "--checkpoint", tmp_path / "pruned.pt", "--out", tmp_path / "x.json")
    assert_one_line_error(result, "already pruned")
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "a-file").write_text("")
    result = cli("latency-table", "--arch", "resnet20", "--out", tmp_path / "a-file" / "t.json")
    assert_one_line_error(result, "cannot write")  # before any timing


def test_reproduce_checks_the_latency_bound_before_any_work(cli, tmp_path, resnet20):  # noqa: F811
    table = measure_table(resnet20, "resnet20", flops_timer, whole_timer=lambda: 1.0, passes=1)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_json()))
    out = tmp_path / "run"
    common = ("--target", "0.5", "--out-dir", out, "--latency-table", path, "--data", tmp_path / "no-data")
    assert_one_line_error(cli("reproduce", "--arch", "resnet20", *common, "--min-speedup", "40"), "unreachable")
    assert_one_line_error(cli("reproduce", "--arch", "resnet56", *common, "--min-speedup", "1.2"),
                          "measured for resnet20")
    assert not out.exists()
    # a reachable bound gets as far as the (missing) data
    assert_one_line_error(cli("reproduce", "--arch", "resnet20", *common, "--min-speedup", "1.2"), "no-data")
