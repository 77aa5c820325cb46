"""`hosts calibrate`: the arithmetic of a calibration (pure), its messages, and a real calibration of a
SYNTHETIC tiny model on two local ranks (real MPI, real llama.cpp)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from pipeinfer_cpu.app.calibrate import busy_warnings, host_weights
from pipeinfer_cpu.app.hostfile import Host, parse_hostfile
from pipeinfer_cpu.head.calibration import CalibrationSettings, shard_layers
from pipeinfer_cpu.modelfiles.shards import ShardFile
from pipeinfer_cpu.rank.calibration import FLOOR_S, spread, tables
from pipeinfer_cpu.timings import HostTiming, load_calibration
from pipeinfer_cpu.wire import control as C


@pytest.mark.parametrize("n_layer, expected", [(30, (2, 6)), (6, (2, 6)), (4, (2, 4)), (2, (1, 2)), (1, (1,))])
def test_shard_depths_fit_the_model(n_layer, expected):
    assert shard_layers(n_layer) == expected


def test_tables_take_differences_that_cancel_fixed_costs_and_report_them_apart():
    fixed, per_layer, output = [0.5e-3, 0.7e-3], [1e-3, 1.8e-3], [4e-3, 9e-3]  # at 1 and 8 tokens
    hidden = [[fixed[j] + k * per_layer[j] for j in range(2)] for k in (2, 6)]
    logits = [hidden[0][j] + output[j] for j in range(2)]
    layer, out, run = tables([2, 6], [1, 8], hidden, logits)
    assert [n for n, _ in layer] == [n for n, _ in out] == [n for n, _ in run] == [1, 8]
    assert np.allclose([s for _, s in layer], per_layer) and np.allclose([s for _, s in out], output)
    assert np.allclose([s for _, s in run], fixed)


def test_tables_never_report_a_cost_of_zero_or_less():
    layer, out, _ = tables([2, 6], [1], [[2e-3], [1.9e-3]], [1.8e-3])  # noise larger than the differences
    assert layer == ((1, FLOOR_S),) and out == ((1, FLOOR_S),)


def test_tables_of_a_one_layer_model_keep_the_fixed_costs():
    layer, out, run = tables([1], [1, 2], [[1e-3, 2e-3]], [3e-3, 5e-3])
    assert layer == ((1, 1e-3), (2, 2e-3)) and np.allclose([s for _, s in out], [2e-3, 3e-3])
    assert run == ((1, 0.0), (2, 0.0))


def test_weights_are_inverse_layer_times_with_the_slowest_host_one():
    timings = [HostTiming(name, 1, ((1, s), (8, 8 * s)), ((1, 1e-3),)) for name, s in
               (("a", 1e-3), ("b", 4e-3), ("c", 3e-3))]
    assert host_weights(timings) == (4.0, 1.0, 1.33)


def test_a_busy_host_is_named():
    idle = [[[1.0, 1.02, 1.01, 1.05]], [[2.0, 2.1, 2.0, 2.05]]]  # [case][count][round]
    busy = [[[1.0, 3.0, 2.5, 2.0]], [[2.0, 4.0, 6.0, 5.0]]]
    assert spread(idle) < 1.1 and spread(busy) > 2
    warnings = busy_warnings([Host("a"), Host("b")], [spread(idle), spread(busy)])
    assert len(warnings) == 1 and warnings[0].startswith("warning: host 2 (b): a typical run took 2.")


def test_calibration_messages_round_trip():
    shard = ShardFile(0, 0, 2, "/x/a.gguf", 10, "ab" * 32)
    for message in (C.Calibrate((shard, shard), 3, (1, 2, 4, 8), 5.0),
                    C.CalibrationReport(((1, 1e-3), (8, 5e-3)), ((1, 2e-3), (8, 9e-3)), 17, 1.25)):
        assert C.decode(C.encode(message)) == message


def test_calibration_settings_round_trip(tmp_path):
    settings = CalibrationSettings(tmp_path / "m.gguf", (0, 4), 2, "haswell")
    assert CalibrationSettings.from_json(settings.to_json()) == settings


def test_calibrating_a_tiny_model_on_two_local_ranks(cli, tmp_path):
    from pipeinfer_cpu.modelfiles.tinymodel import TinyShape, write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf", TinyShape(n_vocab=4096, n_layer=8, n_embd=256, n_head=4,
                                                               n_head_kv=4, n_ff=768, quant="Q4_0"))
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# two stages here\nlocalhost   # threads=1 the first\nlocalhost:1\n")
    out = tmp_path / "out" / "calibrated.txt"
    done = cli("hosts", "calibrate", "--hostfile", str(hostfile), "--model", str(model), "-o", str(out), timeout=240)
    assert done.returncode == 0, done.stderr
    assert "weight" in done.stdout and done.stdout.count("localhost") == 2

    lines = out.read_text().splitlines()
    assert lines[0] == "# two stages here" and lines[1].startswith("localhost   # weight=")
    assert lines[1].endswith(" threads=1 the first") and lines[2].startswith("localhost:1  # weight=")
    hosts = parse_hostfile(out)
    assert [(h.name, h.threads) for h in hosts] == [("localhost", 1), ("localhost", 0)]
    assert min(h.weight for h in hosts) == 1.0 and max(h.weight for h in hosts) < 10

    calibration = load_calibration(out.with_suffix(".timings.json"))
    assert (calibration.model, calibration.n_layers) == ("tiny.gguf", 8)
    auto = max(1, (os.cpu_count() or 1) // 2)  # the host's cores shared by its two ranks, as `run` gives them
    assert [(t.host, t.threads) for t in calibration.hosts] == [("localhost", 1), ("localhost", auto)]
    for timing in calibration.hosts:
        assert [n for n, _ in timing.layer] == [n for n, _ in timing.output] == [1, 2, 4, 8]
        for n in (1, 2, 4, 8):
            assert 0 < timing.layer_s(n) < 1 and 0 < timing.output_s(n) < 1 and math.isfinite(timing.layer_s(n))
        assert timing.layer_s(8) > 0.5 * timing.layer_s(1)  # more tokens per run never make a layer much cheaper

