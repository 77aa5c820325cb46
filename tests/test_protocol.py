import numpy as np

from pipeinfer_cpu import protocol as P
from pipeinfer_cpu.protocol import KvKind, KvOp, Output, RunMessage


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


def test_json_and_id_messages():
    assert P.decode_json(P.encode_json({"type": "stats", "x": [1, 2]})) == {"type": "stats", "x": [1, 2]}
    assert P.decode_ids(P.encode_ids([3, 1, 4])) == [3, 1, 4]
