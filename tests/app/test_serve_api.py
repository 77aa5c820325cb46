"""The OpenAI translation (app/serve/api.py), without a server: bodies into engine requests, refusals,
sampling defaults, and the response and chunk shapes."""

from __future__ import annotations

import pytest

from pipeinfer_cpu.app.serve import api
from pipeinfer_cpu.app.serve.api import ApiError
from pipeinfer_cpu.sampling import SamplingConfig

DEFAULTS = api.Defaults(SamplingConfig(temperature=0.8, top_k=40, seed=7), seed_given=True)


def chat(**body):
    return api.chat_request(api.parse_body(api.ChatBody, {"messages": [{"role": "user", "content": "hi"}], **body}),
                            DEFAULTS)


def refused(fn, **body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fn(**body)
    assert caught.value.status == 400
    return caught.value


def test_a_chat_becomes_a_strict_turn_with_the_whole_conversation():
    request = chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No lists."},
                             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": [{"type": "text", "text": "and "},
                                                          {"type": "text", "text": "you?"}]}],
                   max_completion_tokens=9, stop="END", user="someone", tools=[], parallel_tool_calls=False)
    assert request["type"] == "turn" and request["strict"] and request["first"] == 0
    assert request["conversation"] == {"system": "Be brief.\n\nNo lists.", "turns": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and you?"}]}
    assert request["max_tokens"] == 9 and request["stop"] == ["END"]


def test_sampling_takes_the_request_over_the_operators_defaults():
    assert chat()["sampling"] == {**DEFAULTS.sampling.__dict__}
    asked = chat(temperature=0, top_p=0.5, seed=-1, frequency_penalty=0.5)["sampling"]
    assert asked["temperature"] == 0 and asked["top_p"] == 0.5 and asked["top_k"] == 40
    assert asked["seed"] == 2**32 - 1 and asked["frequency_penalty"] == 0.5


def test_without_a_seed_anywhere_each_request_gets_its_own():
    defaults = api.Defaults(SamplingConfig(temperature=0.8), seed_given=False)
    body = api.parse_body(api.ChatBody, {"messages": [{"role": "user", "content": "hi"}]})
    seeds = {api.chat_request(body, defaults)["sampling"]["seed"] for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages.1"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages.0.content"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
])
def test_what_would_change_the_answers_meaning_is_refused(body, param):
    assert refused(chat, **body).param == param


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"temperature": "hot"}, "temperature"), ({"max_tokens": True}, "max_tokens"), ({"seed": "7"}, "seed"),
    ({"top_k": 1.5}, "top_k"),
])
def test_bad_types_and_ranges_name_the_field(body, param):
    assert refused(chat, **body).param == param


def test_a_value_the_sampler_refuses_is_a_400_too():
    assert "repeat_penalty must be a finite number" in refused(chat, repeat_penalty=float("inf")).message


def test_text_completions_reuse_the_prefix_and_default_to_16_tokens():
    body = api.parse_body(api.CompletionBody, {"prompt": ["Once upon"], "temperature": 0})
    request = api.completion_request(body, DEFAULTS)
    assert request["type"] == "complete" and request["reuse"] and request["strict"] and request["parse_special"]
    assert request["text"] == "Once upon" and request["max_tokens"] == 16
    for prompt in ([1, 2, 3], ["a", "b"], ""):
        with pytest.raises(ApiError):
            api.completion_request(api.parse_body(api.CompletionBody, {"prompt": prompt}), DEFAULTS)


DONE = {"event": "done", "stopped_by": "eos", "answer": "Paris.",
        "stats": {"context_tokens": 30, "reused_tokens": 12, "n_prompt": 18, "n_generated": 3, "ttft_s": 0.2,
                  "decode_tokens_per_s": 20.0, "drafted": 4, "accepted": 3}}


def test_a_chat_response_and_its_usage():
    body = api.Reply(chat=True, model="m").response(DONE)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33,
                             "prompt_tokens_details": {"cached_tokens": 12}}
    assert body["timings"]["predicted_per_second"] == 20.0 and body["timings"]["draft_n_accepted"] == 3


def test_a_chat_stream_opens_with_the_role_and_ends_with_the_reason_then_the_usage():
    reply = api.Reply(chat=True, model="m", include_usage=True)
    assert reply.first_chunk()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert reply.token_chunk("Par")["choices"][0]["delta"] == {"content": "Par"}
    final, usage = reply.final_chunks({**DONE, "stopped_by": "context"})
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 33
    assert reply.token_chunk("x")["usage"] is None  # with include_usage every chunk has the field


def test_a_text_completion_stream_has_text_choices_only():
    reply = api.Reply(chat=False, model="m")
    assert reply.first_chunk() is None
    assert reply.token_chunk("Par")["choices"][0] == {"index": 0, "text": "Par", "logprobs": None,
                                                      "finish_reason": None}
    assert reply.response(DONE)["object"] == "text_completion"
    assert [c["choices"][0]["finish_reason"] for c in reply.final_chunks({**DONE, "stopped_by": "stop"})] == ["stop"]
