"""An MPI program for tests: pipeinfer under forced acceptance patterns and cancellations.

Run as `mpiexec -n 4 python spec_stress.py TARGET DRAFT OUT.json` (head, 2 target stages, draft rank).
The head replaces the real draft with a scripted one that knows the target's own greedy
continuation and guesses right or wrong at random, so every acceptance pattern can be forced.
It checks, after every request, that the output equals the target alone (greedy, greedy with a
repeat penalty, and seeded sampling with penalties) and that every stage's KV cache holds exactly
the committed tokens.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeinfer_cpu.head.decoding import Decoder
from pipeinfer_cpu.head.engine import Engine, EngineSettings
from pipeinfer_cpu.head.executors import LocalExecutor
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.llama.runtime import Stage, StageConfig
from pipeinfer_cpu.rank.main import serve
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest
from pipeinfer_cpu.wire.transport import MpiTransport

GREEDY = SamplingConfig()
# Greedy with a repeat penalty (the stages send logits), and seeded sampling with min-p and the
# penalties: the target's choice then depends on the tokens before the position, which in
# verification are the committed ones and the draft's prefix.
CONFIGS = (GREEDY, SamplingConfig(repeat_penalty=1.3),
           SamplingConfig(temperature=0.8, top_k=40, min_p=0.05, repeat_penalty=1.2, presence_penalty=0.2, seed=5))


class ScriptedDraft:
    """Proposes the target's true next tokens with probability p_right, wrong ones otherwise."""

    def __init__(self, truth: list[int], rng: np.random.Generator, p_right: float, length: int) -> None:
        self.truth, self.rng, self.p_right, self.length = truth, rng, p_right, length
        self._reply = None

    def request(self, request: DraftRequest) -> None:
        context = list(request.context)
        on_track = context == self.truth[:len(context)]
        tokens = []
        for i in range(self.length):
            position = len(context) + i
            right = on_track and position < len(self.truth) and self.rng.random() < self.p_right
            tokens.append(self.truth[position] if right else int(self.rng.integers(1000, 2000)))
        self._reply = DraftReply(request.request_id, tuple(tokens), (1.0,) * len(tokens))

    def poll(self):
        reply, self._reply = self._reply, None
        return reply


def kv_ok(engine: Engine) -> bool:
    """Does every stage's KV sequence 0 end where the head's mirror does?"""
    return all(end == len(engine.context_tokens) - 1 for end in engine.kv_check().values())


def main() -> None:
    target, draft, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    transport = MpiTransport()
    if transport.rank != 0:
        sys.exit(serve(transport))
    settings = EngineSettings(model=target, mode="pipeinfer", draft=draft, n_ctx=2048, timeout_s=60,
                              spec=SpecSettings("pipeinfer", draft_max=8, max_inflight=4, adaptive=False))
    engine = Engine.start(settings, transport)
    reference_context = Context(LocalExecutor(Stage(StageConfig(target, True, True, 2048, 256, 1, 1))))
    reference = Decoder(reference_context, 256, 2048)
    prompt = engine.encode("Write a long story about a lighthouse keeper.", chat=True)
    truths = []
    for sampling in CONFIGS:
        reference_context.reset()
        truths.append(list(prompt) + list(reference.generate(prompt, 40, sampling, lambda t: False).tokens))
    results = {"patterns": 0, "pattern_failures": [], "kv_failures": 0, "cancelled_during": 0,
               "cancelled_before": 0, "continuation_ok": True, "generated": 0}
    real_draft = engine.draft

    # 200 random acceptance patterns: each request forces a different mix of right and wrong guesses,
    # under each sampling configuration in turn.
    for pattern in range(200):
        rng = np.random.default_rng(pattern)
        sampling, truth = CONFIGS[pattern % len(CONFIGS)], truths[pattern % len(CONFIGS)]
        engine.draft = ScriptedDraft(truth, rng, p_right=float(rng.uniform(0, 1)), length=int(rng.integers(1, 9)))
        engine.reset_context()
        generation, _ = engine.generate(list(prompt), 24, sampling)
        results["patterns"] += 1
        if list(generation.tokens) != truth[len(prompt):len(prompt) + len(generation.tokens)]:
            results["pattern_failures"].append(pattern)
        results["kv_failures"] += 0 if kv_ok(engine) else 1

    # Forced cancellations: long runs whose first guess is wrong, so they are cancelled while
    # the stages are still busy with them.
    for attempt in range(12):
        engine.draft = ScriptedDraft(truths[0], np.random.default_rng(1000 + attempt), p_right=0.0, length=64)
        engine.reset_context()
        _, stats = engine.generate(list(prompt), 8, GREEDY)
        results["cancelled_during"] += sum(s.runs_cancelled_during for s in stats.stages)
        results["cancelled_before"] += sum(s.runs_cancelled_before for s in stats.stages)
        results["kv_failures"] += 0 if kv_ok(engine) else 1

    # 500 tokens with the real draft, as several continued requests, mirrored on the target alone.
    engine.draft = real_draft
    engine.reset_context()
    reference_context.reset()
    turns = ["Tell me about the sea.", "Now about mountains.", "And about rivers, at length.",
             "Summarise everything.", "Write a poem about it.", "Now a longer one.", "Explain it."]
    pending: list[int] = []
    turn = 0
    while results["generated"] < 500:
        new = pending + engine.encode(turns[turn % len(turns)], chat=True)
        want = min(128, 500 - results["generated"])
        sampling = CONFIGS[turn % len(CONFIGS)]  # a penalty's history then spans earlier requests too
        generation, _ = engine.generate(new, want, sampling)
        expected = reference.generate(new, want, sampling, engine.vocab.is_end)
        results["continuation_ok"] &= list(generation.tokens) == list(expected.tokens)
        results["kv_failures"] += 0 if kv_ok(engine) else 1
        results["generated"] += len(generation.tokens)
        pending = [generation.tokens[-1]]
        turn += 1
    results["kv_tokens"] = len(engine.context_tokens)
    results["kv_usage"] = {rank: engine.cluster.kv_usage(rank, [0])[0] for rank in engine.stage_ranks}
    engine.close()
    out.write_text(json.dumps(results))
    transport.finalize()


if __name__ == "__main__":
    main()
