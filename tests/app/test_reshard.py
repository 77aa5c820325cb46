"""--on-failure reshard, its pure parts: which stage died, the options of the job on the stages left,
and an answer resumed from the tokens a failed job had shown (in one process: `single`). The real
thing, a stage killed under MPI, is in tests/test_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeinfer_cpu.app.hostfile import parse_hostfile, parse_links, without_host_line
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.app.reshard import Failure, failed_stage, without_stage
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.engine import Engine, EngineSettings
from pipeinfer_cpu.head.server import EngineServer
from pipeinfer_cpu.sampling import SamplingConfig, make_rng

PLACEMENT = ("a", "a", "b", "b", "c")  # head, stages 1-3, the draft rank


@pytest.mark.parametrize("failure, stage", [
    (Failure(rank=2, host=None), 1),  # Open MPI names the rank
    (Failure(rank=0, host=None), None),  # the head: no stage to drop
    (Failure(rank=4, host=None), None),  # the draft rank
    (Failure(rank=None, host="a"), 0),  # MPICH names the host: the only stage there
    (Failure(rank=None, host="b"), 2),  # two stages there: the last
    (Failure(rank=None, host="c"), None),  # only the draft ran there
    (Failure(rank=None, host=None), None),  # mpiexec said nothing
])
def test_failed_stage(failure, stage):
    assert failed_stage(PLACEMENT, 3, failure) == stage


HOSTFILE = """# the lab
node1  # weight=2
node2:2  # threads=4
# link node1 node2 bw=1gbit,delay=1ms
node3 slots=1
# link node2 node3 bw=100mbit,delay=2ms
"""


def test_without_host_line_drops_the_line_and_links_to_a_host_gone():
    text = without_host_line(HOSTFILE, 1, "lab.txt")
    assert text == "# the lab\nnode1  # weight=2\nnode3 slots=1\n"


def test_without_host_line_keeps_links_of_a_host_still_listed():
    text = without_host_line(HOSTFILE + "node2\n", 1, "lab.txt")
    assert "# link node1 node2" in text and "# link node2 node3" in text


def test_without_stage_writes_the_hostfile_left(tmp_path):
    hostfile = tmp_path / "lab.txt"
    hostfile.write_text(HOSTFILE)
    left = without_stage(EngineOptions(hostfile=hostfile), 2, tmp_path)
    assert [h.name for h in parse_hostfile(left.hostfile)] == ["node1", "node2"]
    assert [h.weight for h in parse_hostfile(left.hostfile)] == [2.0, 1.0]
    assert len(parse_links(left.hostfile)) == 1
    assert left.topology.stage_hosts == ("node1", "node2")


def test_without_stage_drops_its_weight_and_counts_stages(tmp_path):
    hostfile = tmp_path / "one.txt"
    hostfile.write_text("localhost\n")
    left = without_stage(EngineOptions(hostfile=hostfile, stages=3, weights="1,2,3"), 1, tmp_path)
    assert left.hostfile == hostfile and left.stages == 2 and left.weights == "1,3"
    assert without_stage(EngineOptions(stages=2), 0, tmp_path).stages == 1


def test_without_the_last_stage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no stage is left"):
        without_stage(EngineOptions(stages=1), 0, tmp_path)


def test_make_rng_skips_the_draws_of_decided_positions():
    whole = make_rng(SamplingConfig(seed=7))
    whole.random(5)
    assert make_rng(SamplingConfig(seed=7), drawn=5).random() == whole.random()


@pytest.fixture(scope="module")
def server(default_model: Path):
    engine = Engine.start(EngineSettings(model=default_model, mode="single", n_ctx=512))
    yield EngineServer(engine)
    engine.close()


def _complete(server: EngineServer, sampling: dict, replay: list[int] = ()) -> tuple[dict, str]:
    events: list[dict] = []
    request = {"type": "complete", "text": "Write a haiku about rain.", "chat_template": True, "fresh": True,
               "max_tokens": 40, "sampling": sampling, "replay": list(replay)}
    server.handle(request, events.append, lambda: False)
    return events[-1], "".join(e["text"] for e in events if e["event"] == "token")


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_a_resumed_answer_goes_on_as_the_whole_one(server, sampling):
    whole, streamed = _complete(server, sampling)
    tokens = whole["stats"]["tokens"]
    for cut in (1, 17):
        resumed, rest = _complete(server, sampling, tokens[:cut])
        assert resumed["stats"]["tokens"] == tokens
        assert resumed["answer"] == whole["answer"] and resumed["stats"]["replayed_tokens"] == cut
        assert whole["answer"].endswith(rest) and len(rest) < len(whole["answer"])


def test_token_events_carry_the_ids_they_show(server):
    events: list[dict] = []
    server.handle({"type": "complete", "text": "Count to five.", "chat_template": True, "fresh": True,
                   "max_tokens": 12}, events.append, lambda: False)
    ids = [i for e in events if e["event"] == "token" for i in e["ids"]]
    assert ids and ids == events[-1]["stats"]["tokens"][:len(ids)]


def test_a_replay_of_no_token_ids_is_refused(server):
    events: list[dict] = []
    server.handle({"type": "complete", "text": "Hi", "replay": [-1]}, events.append, lambda: False)
    assert events[-1]["event"] == "error" and "token ids" in events[-1]["message"]


def test_memory_shortfall_names_the_host_that_cannot_hold_its_stages():
    from pipeinfer_cpu.head.cluster import memory_shortfall
    from pipeinfer_cpu.modelfiles.shards import ShardFile

    def shard(start: int, end: int, gb: float) -> ShardFile:
        return ShardFile(0, start, end, "x.gguf", int(gb * 1e9), "")

    need = {"a": [shard(0, 10, 2.0)], "b": [shard(10, 20, 2.0), shard(20, 30, 2.0)]}
    assert memory_shortfall(need, {"a": int(8e9), "b": int(8e9)}) is None
    assert memory_shortfall(need, {"a": int(8e9)}) is None  # b said nothing: not refused
    message = memory_shortfall(need, {"a": int(8e9), "b": int(3e9)})
    assert message == ("host b has 3.0 GB of memory available, but its stage weights (layers 10-20, 20-30) take "
                       "4.0 GB: add hosts, or give it a smaller weight")
