"""`pipeinfer-cpu plan` and `plan project`: bad input is one clear error and exit 1; good input predicts."""

import json

import pytest
from click.testing import CliRunner

from pipeinfer_cpu.app.plan import plan

GIVEN = ["--layer-ms", "1", "--layers", "8", "--n-embd", "64", "--n-vocab", "100", "--stages", "2", "-n", "32"]


def invoke(*args):
    return CliRunner().invoke(plan, list(args))


@pytest.mark.parametrize("args, fragment", [
    (GIVEN + ["--link", "bw=fast"], "bad link setting 'bw=fast'"),
    (GIVEN + ["--link", "speed=1gbit"], "unknown key 'speed'"),
    (GIVEN + ["--acceptance", "1.5"], "acceptance must be in [0, 1]"),
    (GIVEN + ["--modes", "pipeline,turbo"], "--modes takes some of"),
    (["--stages", "2", "--n-embd", "64", "--n-vocab", "100"], "give --calibration FILE, or --layer-ms"),
    (["--layer-ms", "1", "--layers", "8", "--stages", "2"], "give --model, or --n-embd and --n-vocab"),
    (["--layer-ms", "1", "--layers", "2", "--n-embd", "64", "--n-vocab", "100", "--stages", "3"], "more stages than layers"),
    (["--calibration", "/nonexistent/c.json", "--n-embd", "64", "--n-vocab", "100", "--stages", "2"], "cannot read calibration"),
    (["project", "--mem-bw", "fast", "--out", "unused"], "bad memory bandwidth 'fast'"),
    (["project", "--nodes", "2,x", "--out", "unused"], "--nodes takes comma-separated whole numbers"),
])
def test_bad_input_is_one_error_line_and_exit_1(args, fragment):
    result = invoke(*args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_prediction_table_and_json():
    result = invoke(*GIVEN, "--link", "bw=1gbit,delay=0.1ms", "--draft-ms", "0.2")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("PREDICTION")
    assert [line.split()[0] for line in result.output.splitlines()[2:]] == ["pipeline", "speculative", "pipeinfer"]
    data = json.loads(invoke(*GIVEN, "--modes", "pipeline", "--json").output)
    (prediction,) = data["predictions"]
    assert prediction["mode"] == "pipeline" and prediction["tokens_per_s"] > 0
    assert prediction["bottleneck"].startswith("compute stage")


def test_a_calibration_file(tmp_path):
    from pipeinfer_cpu.timings import Calibration, HostTiming

    path = tmp_path / "c.json"
    Calibration("m", 4, (HostTiming("a", 2, ((1, 0.002),), ((1, 0.001),)),)).save(path)
    result = invoke("--calibration", str(path), "--n-embd", "64", "--n-vocab", "100", "--stages", "2",
                    "--link", "local", "--head-ms", "0", "--modes", "pipeline", "--json", "-n", "8")
    (prediction,) = json.loads(result.output)["predictions"]
    assert prediction["tokens_per_s"] == pytest.approx(1 / (4 * 0.002 + 0.001))


def test_projection_writes_a_labelled_report(tmp_path):
    result = invoke("project", "--nodes", "1,2", "--link", "1gbit", "--modes", "pipeline,pipeinfer",
                    "-n", "24", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "projection.json").read_text())
    assert data["kind"].startswith("PROJECTION")
    assert (tmp_path / "projection.md").read_text().startswith("## PROJECTION")
    assert (tmp_path / "projection.png").stat().st_size > 1000
    rows = {(r["nodes"], r["mode"]): r for r in data["rows"]}
    assert rows[(1, "pipeinfer")]["stages"] is None  # the draft takes the only node
    assert rows[(1, "pipeline")]["stages"] == 1  # 40 GB fits one 64 GB node
    assert rows[(2, "pipeline")]["prediction"]["tokens_per_s"] > 0
