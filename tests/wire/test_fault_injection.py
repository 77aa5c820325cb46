"""PIPEINFER_FAULTS (wire/faults.py), its pure parts; and a corrupt run message is a WireVersionError."""

import numpy as np
import pytest

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.wire.faults import Fault, FaultInjector, parse_faults
from pipeinfer_cpu.wire.runs import RunMessage, Tag, WireVersionError, decode_run, encode_run


def test_parse_faults():
    assert parse_faults("2:die:1; 1:stall=2.5:3:reply ;3:truncate:7:draft") == (
        Fault(2, "die", 1), Fault(1, "stall", 3, Tag.REPLY, 2.5), Fault(3, "truncate", 7, Tag.DRAFT))


@pytest.mark.parametrize("text", ["2:die", "x:die:1", "2:explode:1", "2:die:0", "2:stall:1", "2:die=3:1",
                                  "2:die:1:file", "2:die:1:run:9"])
def test_a_malformed_fault_is_one_line(text):
    with pytest.raises(UserError, match="bad PIPEINFER_FAULTS entry"):
        parse_faults(text)


def test_the_injector_hits_the_nth_message_of_its_tag_only():
    injector = FaultInjector(1, parse_faults("1:truncate:2;2:truncate:1"))
    data = np.arange(8, dtype=np.uint8)
    assert injector.apply(Tag.RUN, data) is data
    assert injector.apply(Tag.REPLY, data) is data  # another tag: counted apart
    assert injector.apply(Tag.RUN, data).nbytes == 4
    assert injector.apply(Tag.RUN, data) is data


def test_version_flips_the_version_byte():
    run = encode_run(RunMessage(5, positions=(0,), seq_ids=((0,),), tokens=(1,), outputs=(True,)))
    corrupt = FaultInjector(0, parse_faults("0:version:1")).apply(Tag.RUN, run)
    with pytest.raises(WireVersionError, match="version 67"):
        decode_run(corrupt)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_run_message_cut_short_is_a_wire_error(keep):
    hidden = np.ones((3, 16), dtype=np.float32)
    run = encode_run(RunMessage(5, positions=(0, 1, 2), seq_ids=((0,),) * 3, tokens=(), outputs=(False,) * 3,
                                payload=hidden))
    with pytest.raises(WireVersionError):
        decode_run(run[: int(run.nbytes * keep)])
