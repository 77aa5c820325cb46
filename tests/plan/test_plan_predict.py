"""The performance model against schedules computed by hand: the head's own loops on a simulated cluster."""

import pytest

from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.plan.inputs import LOCAL, ModelInputs, StageCost
from pipeinfer_cpu.plan.predict import predict
from pipeinfer_cpu.plan.simulation import SimClock, SimPipeline, TargetText
from pipeinfer_cpu.wire.links import LinkSpec
from pipeinfer_cpu.wire.runs import Output, RunMessage

MS = 1e-3
FLAT_1MS = ((1, 1 * MS), (64, 1 * MS))  # 1 ms a run, whatever its tokens
NO_OUTPUT_COST = ((1, 0.0),)


def two_stages(link: LinkSpec, **rest) -> ModelInputs:
    stages = (StageCost(1, FLAT_1MS, NO_OUTPUT_COST), StageCost(1, FLAT_1MS, NO_OUTPUT_COST))
    return ModelInputs(stages, (link, link, link), n_embd=1000, n_vocab=100,
                       **{"head_send_s": 0.0, "head_receive_s": 0.0, **rest})


def test_pipeline_two_stages_half_ms_links():
    """One token a run: 0.5 (head->s0) + 1 + 0.5 + 1 + 0.5 (s1->head) = 3.5 ms a token."""
    p = predict(two_stages(LinkSpec(None, 0.5 * MS)), "pipeline", n_tokens=32)
    assert p.tokens_per_s == pytest.approx(1 / 3.5e-3)
    assert p.itl_p95_s == pytest.approx(3.5e-3)
    assert p.occupancy["compute stage 1"] == pytest.approx(1 / 3.5)
    assert p.shares() == pytest.approx({"compute": 2 / 3.5, "links": 1.5 / 3.5})
    assert not p.saturated


def test_pipeline_bandwidth_bound_hop():
    """1 Mbit/s links: the run to stage 0 is 80 + 32 bytes (0.896 ms), the hidden state 80 + 32 + 1000 * 4
    bytes (32.896 ms), the argmax back 80 + 4 bytes (0.672 ms); plus three 0.5 ms delays and 2 ms compute."""
    p = predict(two_stages(LinkSpec(1e6, 0.5 * MS)), "pipeline", n_tokens=16)
    per_token = 0.896 + 32.896 + 0.672 + 1.5 + 2.0
    assert p.tokens_per_s == pytest.approx(1e3 / per_token)
    assert p.bottleneck == "link stage 0->stage 1"


def test_wire_dtype_shrinks_the_hidden_hop():
    f32 = predict(two_stages(LinkSpec(1e6, 0.0)), "pipeline", n_tokens=8).itl_mean_s
    f16 = predict(two_stages(LinkSpec(1e6, 0.0), wire_dtype="f16"), "pipeline", n_tokens=8).itl_mean_s
    assert f32 - f16 == pytest.approx(1000 * 2 * 8 / 1e6)


def test_head_overhead_is_paid_per_run():
    p = predict(two_stages(LinkSpec(None, 0.5 * MS), head_send_s=0.1 * MS, head_receive_s=0.2 * MS),
                "pipeline", n_tokens=16)
    assert p.tokens_per_s == pytest.approx(1 / 3.8e-3)


SPEC4 = SpecSettings("speculative", draft_max=4, adaptive=False)


@pytest.mark.parametrize("acceptance, tokens_per_round", [(1.0, 5), (0.0, 1)])
def test_speculative_rounds(acceptance, tokens_per_round):
    """Synchronous: draft 4 tokens (0.4 ms), then one run of 5 tokens through both stages (2 ms);
    all right: 4 confirmed + the target's next = 5 tokens a round; all wrong: 1 token a round."""
    inputs = two_stages(LOCAL, acceptance=acceptance, draft_token_s=0.1 * MS)
    p = predict(inputs, "speculative", n_tokens=1 + 5 * 10, spec=SPEC4)
    assert p.tokens_per_s == pytest.approx(tokens_per_round / 2.4e-3)
    assert p.acceptance == pytest.approx(acceptance)


def test_pipeinfer_decides_the_target_text_and_uses_the_pipeline():
    """predict checks that the loop decided the target's own text; with a perfect draft pipeinfer fills
    the idle stages, with a useless one its switch falls back to about plain pipelined speed."""
    link = LinkSpec(None, 0.5 * MS)
    plain = predict(two_stages(link), "pipeline", n_tokens=128).tokens_per_s
    good = predict(two_stages(link, acceptance=1.0, draft_token_s=0.1 * MS), "pipeinfer", n_tokens=128)
    bad = predict(two_stages(link, acceptance=0.0, draft_token_s=0.1 * MS), "pipeinfer", n_tokens=128)
    assert good.tokens_per_s > 2 * plain
    assert bad.tokens_per_s == pytest.approx(plain, rel=0.15)
    assert bad.runs_cancelled > 0


def _run(run_id, position):
    return RunMessage(run_id, (position,), ((0,),), (7,), (True,), output_kind=Output.ARGMAX)


def test_a_cancel_skips_a_run_not_started_and_aborts_one_in_progress():
    clock = SimClock()
    pipeline = SimPipeline(two_stages(LOCAL), clock, TargetText(1.0, 0, 16))
    pipeline.launch(_run(1, 0))
    pipeline.launch(_run(2, 1))  # waits for run 1 at stage 0: starts there at 1 ms
    clock.wait_until(0.5 * MS)
    pipeline.cancel([2])
    assert pipeline.wait().run_id == 1 and clock.now() == pytest.approx(2 * MS)
    assert pipeline.poll() is None and pipeline.next_event(clock.now()) is None
    skipped = pipeline.runs[1]
    assert skipped.intervals == [(0, 1 * MS, 1 * MS, False)]  # skipped: never computed, nothing sent on

    pipeline.launch(_run(3, 2))  # stage 0 at 2..3 ms
    clock.wait_until(2.5 * MS)
    pipeline.cancel([3])  # aborted at 2.5 ms: stage 0 is free again then
    pipeline.launch(_run(4, 3))
    result = pipeline.wait()
    assert result.run_id == 4 and result.payload.tolist() == [TargetText.token(4)]
    assert clock.now() == pytest.approx(4.5 * MS)


def test_calibrated_stages_pay_their_layers_and_the_output_layer_once():
    from pipeinfer_cpu.timings import Calibration, HostTiming

    fast = HostTiming("a", 4, ((1, 1 * MS), (4, 2 * MS)), ((1, 3 * MS),))
    slow = HostTiming("b", 4, ((1, 3 * MS), (4, 6 * MS)), ((1, 5 * MS),))
    calibration = Calibration("m", 8, (fast, slow))
    equal = ModelInputs.from_calibration(calibration, 2, LOCAL, 64, 100, head_send_s=0, head_receive_s=0)
    assert [s.layers for s in equal.stages] == [4, 4]
    assert equal.stages[1].compute_s(1, 1, last=True) == pytest.approx(4 * 3 * MS + 5 * MS)
    assert equal.stages[0].compute_s(4, 1, last=False) == pytest.approx(4 * 2 * MS)
    by_speed = ModelInputs.from_calibration(calibration, 2, LOCAL, 64, 100, split="speed")
    assert [s.layers for s in by_speed.stages] == [6, 2]
    p = predict(equal, "pipeline", n_tokens=8)
    assert p.tokens_per_s == pytest.approx(1 / (4 * MS + 12 * MS + 5 * MS))


def test_uniform_inputs_scale_runs_by_the_extra_token_cost():
    inputs = ModelInputs.uniform(10, 3, 1 * MS, 2 * MS, LOCAL, 64, 100, extra_token_cost=0.5)
    assert [s.layers for s in inputs.stages] == [4, 3, 3]
    assert inputs.stages[0].compute_s(3, 0, last=False) == pytest.approx(4 * 2 * MS)
    assert inputs.stages[2].compute_s(1, 1, last=True) == pytest.approx(3 * MS + 2 * MS)


def _stages(n: int) -> ModelInputs:
    stage = StageCost(1, ((1, 10 * MS), (2, 12.5 * MS)), NO_OUTPUT_COST)  # a token more: a quarter more
    return ModelInputs((stage,) * n, (LOCAL,) * (n + 1), n_embd=1000, n_vocab=100, acceptance=0.6,
                       draft_token_s=2 * MS)


def _traced(monkeypatch, inputs: ModelInputs, spec: SpecSettings) -> tuple[list[int], int]:
    """Draft tokens asked per request, and the most runs ever in flight, in one simulated request."""
    from pipeinfer_cpu.plan import simulation

    asked, most = [], [0]
    request, launch = simulation.SimDraft.request, SimPipeline.launch

    def traced_request(self, req):
        asked.append(req.max_new)
        request(self, req)

    def traced_launch(self, run):
        launch(self, run)
        now = self.clock.now()
        most[0] = max(most[0], sum(1 for r in self.runs if not r.delivered and r.cancel_at > now))

    monkeypatch.setattr(simulation.SimDraft, "request", traced_request)
    monkeypatch.setattr(SimPipeline, "launch", traced_launch)
    predict(inputs, "pipeinfer", n_tokens=96, spec=spec)
    return asked, most[0]


def test_several_stages_get_one_draft_token_per_run_and_a_run_in_flight_per_stage(monkeypatch):
    asked, most = _traced(monkeypatch, _stages(8), SpecSettings("pipeinfer"))
    assert set(asked) == {1} and most == 8


def test_one_stage_and_fixed_length_keep_longer_runs(monkeypatch):
    asked, _ = _traced(monkeypatch, _stages(1), SpecSettings("pipeinfer"))
    assert max(asked) > 1
    asked, most = _traced(monkeypatch, _stages(8), SpecSettings("pipeinfer", adaptive=False, draft_max=3))
    assert set(asked) == {3} and most <= 4


def test_one_token_runs_beat_long_ones_on_eight_stages():
    """What made them the default (measured on 16 cores too: README)."""
    one = predict(_stages(8), "pipeinfer", n_tokens=256).tokens_per_s
    long = predict(_stages(8), "pipeinfer", n_tokens=256, spec=SpecSettings("pipeinfer", adaptive=False)).tokens_per_s
    assert one > 1.1 * long
