"""The n-gram draft (head/ngram.py), pure: what it proposes, when it proposes nothing, how it follows
a context that grows (a chat's next turn) or changes (a rejected guess), and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.ngram import NgramDrafter, NgramSettings
from pipeinfer_cpu.wire.drafts import DraftRequest


def propose(drafter: NgramDrafter, context, max_new: int = 8, min_prob: float = 0.0):
    reply = drafter.draft(DraftRequest(1, tuple(context), max_new, min_prob))
    return list(reply.tokens), list(reply.probs)


def test_the_continuation_of_an_earlier_occurrence_is_proposed():
    #          def  f  (  x  )  :  return  x  ...  def  f  (
    context = [10, 11, 12, 13, 14, 15, 16, 13, 99, 10, 11, 12]
    tokens, probs = propose(NgramDrafter(NgramSettings(3, 4)), context)
    assert tokens == [13, 14, 15, 16]
    assert probs == [1.0] * 4


def test_no_match_proposes_nothing():
    assert propose(NgramDrafter(NgramSettings(3, 4)), [1, 2, 3, 4, 5]) == ([], [])


def test_a_shorter_ngram_is_used_when_the_longest_is_not_found_but_never_a_single_token_by_default():
    drafter = NgramDrafter(NgramSettings(3, 2))
    assert propose(drafter, [7, 1, 2, 3, 9, 1, 2])[0] == [3, 9]  # "1 2" found; "x 1 2" not
    assert propose(drafter, [7, 1, 5, 2])[0] == []  # only "2" would match: too weak
    assert propose(NgramDrafter(NgramSettings(1, 2)), [7, 1, 5, 1])[0] == [5, 1]  # N = 1 asks for it


def test_overlapping_repeats_are_followed():
    tokens, _ = propose(NgramDrafter(NgramSettings(2, 5)), [1, 2, 1, 2, 1])
    assert tokens == [2, 1, 2, 1, 2]


def test_the_most_frequent_continuation_wins_with_its_share_as_probability():
    # after "1 2": 3, 3, 4 -> 3 with 2/3; the runner-up 4 with 1/3
    drafter = NgramDrafter(NgramSettings(2, 1))
    reply = drafter.draft(DraftRequest(5, (1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 4, 0, 1, 2), 1, 0.0))
    assert reply.request_id == 5 and reply.tokens == (3,) and reply.probs == (pytest.approx(2 / 3),)
    assert reply.second_tokens == (4,) and reply.second_probs == (pytest.approx(1 / 3),)


def test_drafting_stops_below_the_policys_probability_and_at_max_new():
    context = [1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 6, 1, 2]
    drafter = NgramDrafter(NgramSettings(2, 8))
    assert propose(drafter, context, min_prob=0.6)[0] == [3]  # "1 2" -> 3 2/3 of the time; "2 3" -> 1 or 5: 1/2
    assert propose(drafter, context, min_prob=0.9)[0] == []  # not even the first: a likely wrong guess costs a run
    assert len(propose(drafter, [1, 2] * 10, max_new=3)[0]) == 3


def test_the_index_follows_the_context_across_turns_and_after_a_rejected_guess():
    drafter = NgramDrafter(NgramSettings(3, 3))
    first_turn = [50, 51, 52, 53, 54, 60]
    assert propose(drafter, first_turn)[0] == []
    next_turn = first_turn + [70, 50, 51, 52]  # a later turn quotes the first: found in the index
    assert propose(drafter, next_turn)[0] == [53, 54, 60]
    changed = next_turn[:-2] + [80, 81]  # a guess was rejected: the context's end differs
    assert propose(drafter, changed)[0] == []
    assert drafter.tokens == changed
    fresh = NgramDrafter(NgramSettings(3, 3))
    propose(fresh, changed)
    assert drafter.followers == fresh.followers  # what was taken out left nothing behind


@pytest.mark.parametrize("text, settings", [("ngram", NgramSettings(3, 8)), ("ngram:2,5", NgramSettings(2, 5))])
def test_settings_parse(text, settings):
    assert NgramSettings.is_spec(text) and NgramSettings.parse(text) == settings


@pytest.mark.parametrize("text, fragment", [("ngram:0,5", "N (the n-gram size) must be 1 to 16"),
                                            ("ngram:3,0", "K (tokens proposed) must be 1 to 64"),
                                            ("ngram:3", "expected ngram or ngram:N,K"),
                                            ("ngram:a,b", "whole numbers")])
def test_bad_settings_say_what_is_expected(text, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        NgramSettings.parse(text)
    assert not NgramSettings.is_spec("ngrams.gguf")


def test_ngram_first_asks_the_model_only_where_the_lookup_finds_nothing():
    from pipeinfer_cpu.head.draft_clients import NgramFirstDraftClient
    from pipeinfer_cpu.wire.drafts import DraftReply

    class Model:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def request(self, request: DraftRequest) -> None:
            self.asked.append(request.request_id)

        def poll(self):
            return DraftReply(self.asked[-1], (7, 7), (0.9, 0.9)) if self.asked else None

    model = Model()
    client = NgramFirstDraftClient(NgramDrafter(NgramSettings(2, 4)), model)
    client.request(DraftRequest(1, (1, 2, 3, 1, 2), 4, 0.0))  # "1 2" was followed by 3: the lookup answers
    assert client.poll().tokens[0] == 3 and model.asked == []
    client.request(DraftRequest(2, (4, 5, 6), 4, 0.0))  # nothing repeats: the model drafts
    assert model.asked == [2] and client.poll().tokens == (7, 7)


def test_ngram_plus_a_model_names_both():
    from pipeinfer_cpu.app.options import EngineOptions

    options = EngineOptions(draft=Path("ngram:2,5+qwen2.5-coder-0.5b"))
    assert options.ngram == NgramSettings(2, 5) and options.draft_model == Path("qwen2.5-coder-0.5b")
    assert EngineOptions(draft=Path("ngram")).draft_model is None
    with pytest.raises(UserError, match="name the model after"):
        EngineOptions(draft=Path("ngram+")).draft_model
