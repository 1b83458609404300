"""The body an upstream is sent: the client's own, as it came, or one built from the validated
request where the client's body is not at hand."""

from __future__ import annotations

from typing import Any

from llmserve.validation.request import ValidatedRequest

# Fields of the client's body that are llmserve's, not the upstream's: the queue honours the
# priority (vLLM refuses one unless started with priority scheduling); the stream is llmserve's.
_NOT_FORWARDED = ("priority", "stream", "stream_options")


def forwarded_body(request: ValidatedRequest, model: str) -> dict[str, Any]:
    """What is sent upstream for ``request``, always as a stream llmserve reads (embeddings
    excepted), with the upstream's model name."""
    if request.kind in ("embeddings", "responses"):
        assert request.body is not None
        sent = {k: v for k, v in request.body.items() if k != "priority"}
        sent["model"] = model
        if request.kind == "responses":
            sent["stream"] = True  # read as a stream, whatever the client asked for
        return sent
    if request.body is not None:
        # The client's own request, every field as sent: the upstream gives each one its
        # meaning (tools, response_format, min_tokens, content parts, chat_template_kwargs,
        # ...). Only the model name and the streaming llmserve reads are set here.
        sent = {k: v for k, v in request.body.items() if k not in _NOT_FORWARDED}
        sent["model"] = model
        sent["stream"] = True
        sent["stream_options"] = {"include_usage": True}
        return sent
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": s.n,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    if s.ignore_eos:
        body["ignore_eos"] = True
    optional = {
        # Only what the client asked for: the upstream knows its context, we only estimate.
        "max_tokens": s.requested_max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
        "stop": list(s.stop) or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if s.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = s.logprobs
    else:
        body["prompt"] = request.prompt
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
    return body
