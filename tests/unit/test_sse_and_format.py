"""SSE framing, OpenAI chunk and response formats, stream encoders, and the simulated engine's
stop-sequence handling, tested without a server."""

from __future__ import annotations

from typing import Any

import pytest
from tests.support import sse as reader
from tests.support.errors import assert_openai_error
from tests.support.sse import Event

from llmserve.config import SimulatedModel
from llmserve.engines.events import ChoiceFinished, TextDelta, TokenLogprob, UsageReport
from llmserve.engines.simulated import _WORDS, SimulatedEngine, StopScanner
from llmserve.errors import ContextLengthExceeded, EngineTimeout
from llmserve.serving.engine_request import ChoiceResult, Collected, collect
from llmserve.streaming import sse
from llmserve.streaming.encoders import GenerateStreamEncoder, OpenAIStreamEncoder
from llmserve.streaming.openai_format import (
    ChunkFormatter,
    chat_logprobs,
    completion_logprobs,
    full_response,
)
from llmserve.validation.request import RequestKind, SamplingOptions, ValidatedRequest

# --- the frames parse back with a spec-following reader (tests/support/sse.py) ----------------


NASTY_TOKENS = [
    "plain",
    "line\nbreak",
    "crlf\r\nbreak",
    "lone\rcr",
    "data: x",
    "\n\ndata: [DONE]\n\n",
    "event: end\ndata: {}",
    ": not a comment",
    "",
    "unicode \u2028 \u2029 é 🦊",
    '"quoted" \\ backslash',
]


@pytest.mark.parametrize("token", NASTY_TOKENS)
def test_data_frame_round_trips_any_token(token: str) -> None:
    frame = sse.data({"token": token})
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # the only line break is the frame's own end
    assert b"\r" not in frame
    events = reader.parse_events(frame)
    assert len(events) == 1
    assert events[0].json() == {"token": token}


def test_many_nasty_frames_in_one_stream_parse_back_in_order() -> None:
    stream = b"".join(sse.data({"token": t}) for t in NASTY_TOKENS) + sse.DONE
    events = reader.parse_events(stream)
    assert [e.json()["token"] for e in events[:-1]] == NASTY_TOKENS
    assert events[-1] == Event("[DONE]")


@pytest.mark.parametrize("token", NASTY_TOKENS)
def test_named_event_round_trips_any_token(token: str) -> None:
    frame = sse.event("end", {"token": token})
    events = reader.parse_events(frame)
    assert len(events) == 1
    assert events[0].event == "end"
    assert events[0].json() == {"token": token}


def test_done_and_comment_frames() -> None:
    assert reader.parse_events(sse.DONE) == [Event("[DONE]")]
    comment = sse.comment("keep\nalive\r\ndata: x")
    assert comment.startswith(b": ")
    assert reader.parse_events(comment + sse.data(1)) == [Event("1")]


# --- requests for the formatters -------------------------------------------------------------


def make_request(
    kind: RequestKind = "chat", *, n: int = 1, logprobs: int | None = None, max_tokens: int = 8
) -> ValidatedRequest:
    prefix = {"chat": "chatcmpl", "completion": "cmpl", "generate": "gen"}[kind]
    return ValidatedRequest(
        request_id=f"{prefix}-test",
        model="sim",
        kind=kind,
        prompt="hello",
        prompt_token_ids=(1,),
        prompt_tokens=3,
        sampling=SamplingOptions(max_tokens=max_tokens, n=n, logprobs=logprobs),
    )


def payloads(frames: list[bytes]) -> list[Any]:
    out = []
    for frame in frames:
        (event,) = reader.parse_events(frame)
        out.append(event.data if event.done else event.json())
    return out


def encode_all(encoder: Any, events: list[Any]) -> list[Any]:
    frames: list[bytes] = []
    for event in events:
        frames.extend(encoder.encode(event))
    frames.extend(encoder.end())
    return payloads(frames)


TWO_CHOICES = [
    TextDelta(0, " the", 1),
    TextDelta(1, " quick", 1),
    TextDelta(0, " fox", 1),
    ChoiceFinished(0, "length"),
    TextDelta(1, " dog", 1),
    ChoiceFinished(1, "stop"),
    UsageReport(3, 4),
]


def test_chat_stream_opens_each_choice_with_role_and_ends_with_done() -> None:
    chunks = encode_all(OpenAIStreamEncoder(make_request(n=2), False), TWO_CHOICES)
    assert chunks[-1] == "[DONE]"
    body = chunks[:-1]
    for chunk in body:
        assert chunk["id"] == "chatcmpl-test"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "sim"
        assert isinstance(chunk["created"], int)
        assert "usage" not in chunk  # no usage anywhere without include_usage
        assert len(chunk["choices"]) == 1
    choices = [c["choices"][0] for c in body]
    # Per index: the first chunk is the role chunk, and it comes only once.
    for index in (0, 1):
        mine = [c for c in choices if c["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[0]["finish_reason"] is None
        assert sum("role" in c["delta"] for c in mine) == 1
        assert mine[-1]["delta"] == {}
        assert mine[-1]["finish_reason"] == ("length" if index == 0 else "stop")
    text = {
        i: "".join(c["delta"].get("content", "") for c in choices if c["index"] == i)
        for i in (0, 1)
    }
    assert text == {0: " the fox", 1: " quick dog"}
    assert [c["index"] for c in choices] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_chat_stream_with_include_usage_ends_with_usage_chunk_then_done() -> None:
    chunks = encode_all(OpenAIStreamEncoder(make_request(n=2), True), TWO_CHOICES)
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert usage_chunk["object"] == "chat.completion.chunk"
    # Every other chunk carries usage: null, as OpenAI's do.
    assert all(c["usage"] is None for c in chunks[:-2])
    assert sum(1 for c in chunks[:-1] if c["usage"]) == 1


def test_completion_stream_chunks_have_text_and_no_role() -> None:
    events = [TextDelta(0, " the", 1), TextDelta(0, " fox", 1), ChoiceFinished(0, "length")]
    chunks = encode_all(
        OpenAIStreamEncoder(make_request("completion"), False), [*events, UsageReport(3, 2)]
    )
    assert chunks[-1] == "[DONE]"
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert all("delta" not in c and "role" not in c for c in choices)
    assert [c["text"] for c in choices] == [" the", " fox", ""]
    assert [c["finish_reason"] for c in choices] == [None, None, "length"]
    assert all(c["logprobs"] is None for c in choices)


def test_stream_logprobs_shapes() -> None:
    lp = (TokenLogprob(" the", -0.5, ((" the", -0.5), (" a", -1.5))),)
    chat = payloads(
        OpenAIStreamEncoder(make_request(logprobs=2), False).encode(TextDelta(0, " the", 1, lp))
    )
    content = chat[1]["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": " the",
            "logprob": -0.5,
            "bytes": list(b" the"),
            "top_logprobs": [
                {"token": " the", "logprob": -0.5, "bytes": list(b" the")},
                {"token": " a", "logprob": -1.5, "bytes": list(b" a")},
            ],
        }
    ]
    completion = payloads(
        OpenAIStreamEncoder(make_request("completion", logprobs=2), False).encode(
            TextDelta(0, " the", 1, lp)
        )
    )
    assert completion[0]["choices"][0]["logprobs"] == {
        "tokens": [" the"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{" the": -0.5, " a": -1.5}],
        "text_offset": [0],
    }


def test_stream_completion_text_offsets_run_on_across_chunks_per_choice() -> None:
    encoder = OpenAIStreamEncoder(make_request("completion", n=2, logprobs=0), False)

    def offsets(index: int, text: str) -> list[int]:
        lp = (TokenLogprob(text, -0.5),)
        (chunk,) = payloads(encoder.encode(TextDelta(index, text, 1, lp)))
        return list(chunk["choices"][0]["logprobs"]["text_offset"])

    assert offsets(0, " the") == [0]
    assert offsets(1, " quick") == [0]
    assert offsets(0, " fox") == [4]
    assert offsets(1, " dog") == [6]
    assert offsets(0, ".") == [8]


def test_in_band_error_frames_end_an_openai_stream() -> None:
    encoder = OpenAIStreamEncoder(make_request(), False)
    frames = encoder.error(EngineTimeout("too slow", code="request_timeout"))
    assert payloads(frames) == [
        {
            "error": {
                "message": "too slow",
                "type": "server_error",
                "param": None,
                "code": "request_timeout",
            }
        },
        "[DONE]",
    ]


def test_generate_encoder_emits_tokens_then_end_event() -> None:
    encoder = GenerateStreamEncoder()
    frames: list[bytes] = []
    for event in [TextDelta(0, "a\nb", 1), TextDelta(0, "", 1), TextDelta(0, " c", 1)]:
        frames.extend(encoder.encode(event))
    frames.extend(encoder.encode(ChoiceFinished(0, "stop")))
    frames.extend(encoder.encode(UsageReport(2, 3)))
    frames.extend(encoder.end())
    events = reader.parse_events(b"".join(frames))
    assert events[:2] == [Event('{"token":"a\\nb"}'), Event('{"token":" c"}')]
    assert events[2].event == "end"
    assert events[2].json() == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
    }
    assert len(events) == 3  # empty text makes no event, and /generate has no [DONE]


def test_generate_encoder_error_is_an_error_event() -> None:
    events = reader.parse_events(
        b"".join(GenerateStreamEncoder().error(ContextLengthExceeded("long")))
    )
    assert events[0].event == "error"
    assert_openai_error(events[0].json(), code="context_length_exceeded")


# --- whole responses ---------------------------------------------------------------------------


def collected(with_logprobs: bool = False) -> Collected:
    lp = [TokenLogprob(" the", -0.5, ((" the", -0.5),)), TokenLogprob(" fox", -0.25, ())]
    return Collected(
        [
            ChoiceResult([" the", " fox"], lp if with_logprobs else [], "length"),
            ChoiceResult([" dog"], lp[:1] if with_logprobs else [], "stop"),
        ],
        prompt_tokens=3,
        completion_tokens=3,
    )


def test_full_chat_response() -> None:
    body = full_response(make_request(n=2), collected())
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-test"
    assert body["model"] == "sim"
    assert body["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
            "message": {"role": "assistant", "content": " the fox"},
        },
        {
            "index": 1,
            "logprobs": None,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": " dog"},
        },
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_full_completion_response_with_logprobs() -> None:
    body = full_response(make_request("completion", n=2, logprobs=1), collected(True))
    assert body["object"] == "text_completion"
    first = body["choices"][0]
    assert first["text"] == " the fox"
    assert "message" not in first
    assert first["logprobs"] == {
        "tokens": [" the", " fox"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{" the": -0.5}, {}],
        "text_offset": [0, 4],
    }


def test_logprob_helpers_offsets_and_bytes() -> None:
    tokens = [TokenLogprob("é", -1.0), TokenLogprob("ab", -2.0)]
    assert completion_logprobs(tokens, 10)["text_offset"] == [10, 11]
    assert chat_logprobs(tokens)["content"][0]["bytes"] == [0xC3, 0xA9]


def test_chunk_formatter_finish_shapes() -> None:
    chat = ChunkFormatter(make_request(), False).finish(0, "stop")
    assert chat["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "delta": {}}]
    comp = ChunkFormatter(make_request("completion"), False).finish(2, "length")
    assert comp["choices"] == [
        {"index": 2, "logprobs": None, "finish_reason": "length", "text": ""}
    ]


# --- the simulated engine's stop sequences -----------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        ([" the", " quick"], (), [(" the", False), (" quick", False)]),
        ([" the", " quick"], ("zzz",), [(" the", False), (" quick", False)]),
        ([" the", " quick"], (" quick",), [(" the", False), ("", True)]),
        ([" the", " quick"], ("ick",), [(" the", False), (" qu", True)]),
        ([" the", " quick"], ("q",), [(" the", False), (" ", True)]),
        # A stop that straddles two pieces: its start is held back, then dropped.
        ([" the qu", "ick"], ("quick",), [(" the ", False), ("", True)]),
        # Held-back text that turns out not to be a stop is sent with the next piece.
        ([" the qu", "ack"], ("quick",), [(" the ", False), ("quack", False)]),
        # A tail that may begin a stop is held back; the match then drops it.
        ([" the", " quick"], ("he q",), [(" t", False), ("", True)]),
    ],
)
def test_stop_scanner(
    pieces: list[str], stops: tuple[str, ...], expected: list[tuple[str, bool]]
) -> None:
    scanner = StopScanner(stops)
    assert [scanner.feed(piece) for piece in pieces[: len(expected)]] == expected


def test_stop_scanner_cuts_at_the_earliest_of_several_stops() -> None:
    scanner = StopScanner(("own", " br"))
    assert scanner.feed(" the quick") == (" the quick", False)
    text, stopped = scanner.feed(" brown")
    assert stopped
    assert text == ""


def test_stop_scanner_flush_returns_held_back_text() -> None:
    scanner = StopScanner(("dog!",))
    assert scanner.feed(" lazy do") == (" lazy ", False)
    assert scanner.flush() == "do"


def sim_engine(**config: Any) -> SimulatedEngine:
    return SimulatedEngine(
        SimulatedModel(
            engine="simulated",
            name="sim",
            tokens_per_second=10_000,
            first_token_latency_s=0,
            **config,
        )
    )


def engine_request(
    *, stop: tuple[str, ...] = (), n: int = 1, max_tokens: int = 8, seed: int | None = None
) -> ValidatedRequest:
    return ValidatedRequest(
        request_id="cmpl-sim",
        model="sim",
        kind="completion",
        prompt="hi",
        prompt_token_ids=None,
        prompt_tokens=1,
        sampling=SamplingOptions(max_tokens=max_tokens, stop=stop, n=n, seed=seed),
    )


async def run_engine(request: ValidatedRequest) -> tuple[SimulatedEngine, Collected]:
    engine = sim_engine()
    return engine, await collect(engine.generate(request), request)


async def test_simulated_engine_without_stop_runs_to_length() -> None:
    engine, result = await run_engine(engine_request(max_tokens=4, n=2))
    assert ["".join(c.text) for c in result.choices] == [
        "".join(_WORDS[0:4]),
        "".join(_WORDS[1:5]),
    ]
    assert [c.finish_reason for c in result.choices] == ["length", "length"]
    assert result.completion_tokens == 8
    assert engine.completed == ["cmpl-sim"]
    assert engine.active == set()
    assert engine.aborted == []


async def test_simulated_engine_seed_shifts_the_words() -> None:
    _, result = await run_engine(engine_request(max_tokens=2, seed=3))
    assert "".join(result.choices[0].text) == _WORDS[3] + _WORDS[4]


async def test_simulated_engine_stops_without_the_stop_text() -> None:
    _, result = await run_engine(engine_request(stop=(" fox",), max_tokens=8))
    choice = result.choices[0]
    assert "".join(choice.text) == " the quick brown"
    assert choice.finish_reason == "stop"
    assert result.completion_tokens == 4  # the stop token was generated


async def test_simulated_engine_stop_inside_a_word_keeps_the_part_before_it() -> None:
    _, result = await run_engine(engine_request(stop=("ow",), max_tokens=8))
    assert "".join(result.choices[0].text) == " the quick br"
    assert result.choices[0].finish_reason == "stop"


async def test_simulated_engine_stop_per_choice() -> None:
    # Choice 0 reaches " fox" at step 3, choice 1 at step 2; each stops on its own.
    _, result = await run_engine(engine_request(stop=(" fox",), n=2, max_tokens=8))
    assert ["".join(c.text) for c in result.choices] == [" the quick brown", " quick brown"]
    assert [c.finish_reason for c in result.choices] == ["stop", "stop"]


async def test_simulated_engine_multi_token_stop_excludes_every_part_of_it() -> None:
    _, result = await run_engine(engine_request(stop=(" quick brown",), max_tokens=8))
    assert result.choices[0].finish_reason == "stop"
    assert "".join(result.choices[0].text) == " the"
