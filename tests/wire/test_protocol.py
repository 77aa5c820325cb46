import numpy as np
import pytest

from pipeinfer_cpu.modelfiles.planning import LayerRange
from pipeinfer_cpu.modelfiles.shards import ShardFile
from pipeinfer_cpu.stats import StageStats
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire import runs as P
from pipeinfer_cpu.wire.runs import KvKind, KvOp, Output, RunMessage


def roundtrip(message: RunMessage) -> RunMessage:
    return P.decode_run(P.encode_run(message))


def test_run_with_tokens_seq_ids_ops_and_hidden_states():
    hidden = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    message = RunMessage(7, (10, 11, 12), ((0,), (0, 3), (5,)), (1, 2, 3), (False, False, True),
                         (KvOp(KvKind.CP, 0, 3, 0, 10), KvOp(KvKind.RM, 4)), Output.LOGITS, hidden)
    back = roundtrip(message)
    assert back == message
    assert np.array_equal(back.payload, hidden)


def test_argmax_payload_and_ops_only_messages():
    ids = np.array([5, 9], dtype=np.int32)
    back = roundtrip(RunMessage(3, output_kind=Output.ARGMAX, payload=ids))
    assert back.payload.dtype == np.int32 and list(back.payload) == [5, 9]
    ops = RunMessage(9, (1,), ((0,),), (4,), (True,), (KvOp(KvKind.CLEAR),)).ops_only()
    back = roundtrip(ops)
    assert back.is_ops_only and back.kv_ops == (KvOp(KvKind.CLEAR),) and back.payload is None


def test_control_and_id_messages():
    for message in (C.Setup("haswell"), C.KvUsage({0: (0, 7), 3: (-1, -1)}), C.KvUsageRequest((0, 3)),
                    C.StageReport(StageStats(2, "node", (0, 15), 1.5, 2.0, 10, prefill_tokens=4), 99),
                    C.Failure("boom"), C.Signal.BYE, C.Hello("node", 1, 2, P.WIRE_VERSION, None, "no AVX2")):
        assert C.decode(C.encode(message)) == message
    assert P.decode_ids(P.encode_ids([3, 1, 4])) == [3, 1, 4]


def test_an_assignment_keeps_its_shard_and_role():
    shard = ShardFile(1, 15, 30, "/x/stage1.gguf", 123, "ab" * 32)
    assignment = C.Assignment(1, LayerRange(15, 30, 30), shard, 2048, 256, 1, 1, 1, 0, True, C.Role.DRAFT)
    back = C.decode(C.encode(C.Assign(assignment))).assignment
    assert back == assignment and back.layers.is_last and not back.layers.is_first


def test_an_unknown_control_message_is_a_wire_version_error():
    with pytest.raises(P.WireVersionError):
        C.decode(np.frombuffer(b'{"type": "from-the-future"}', dtype=np.uint8))


def test_logits_of_large_vocabularies_keep_their_shape():
    """Qwen's 151,936 and Gemma 3's 262,144 columns (the old header packed rows * 65536 + cols)."""
    for rows, cols in ((1, 151_936), (3, 262_144), (70_000, 2)):
        logits = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
        back = roundtrip(RunMessage(1, output_kind=Output.LOGITS, payload=logits))
        assert back.payload.shape == (rows, cols) and np.array_equal(back.payload, logits)


def test_the_first_byte_is_the_format_version_and_another_version_is_refused():
    data = P.encode_run(RunMessage(4, (0,), ((0,),), (9,), (True,)))
    assert data[0] == P.WIRE_VERSION
    data[0] = P.WIRE_VERSION + 1
    with pytest.raises(P.WireVersionError, match=f"version {P.WIRE_VERSION + 1}.*speaks version {P.WIRE_VERSION}"):
        P.decode_run(data)
    with pytest.raises(P.WireVersionError, match="shorter"):
        P.decode_run(data[:12])


def test_payloads_other_than_float32_or_int32_vectors_and_matrices_are_refused():
    for bad in (np.zeros(3, dtype=np.float64), np.zeros((1, 2, 3), dtype=np.float32)):
        with pytest.raises(TypeError):
            P.encode_run(RunMessage(1, payload=bad))
