"""The admission ticket of a request: who asks, what it may cost, how long it may wait."""

from __future__ import annotations

import math
from collections.abc import Mapping

from llmserve.auth.principal import Principal
from llmserve.config import ModelConfig
from llmserve.errors import InvalidRequest
from llmserve.scheduling.admission import Ticket
from llmserve.validation.request import ValidatedRequest

QUEUE_TIMEOUT_HEADER = "x-queue-timeout"


def ticket_for(
    headers: Mapping[str, str],
    generation: ValidatedRequest,
    principal: Principal,
    model: ModelConfig,
    request_timeout_s: float,
) -> Ticket:
    """``request_timeout_s`` bounds the queue wait too: it covers queue and generation."""
    sampling = generation.sampling
    return Ticket(
        request_id=generation.request_id,
        tenant=principal.tenant,
        cost=generation.prompt_tokens + sampling.max_tokens * sampling.n,
        prompt_tokens=generation.prompt_tokens,
        timeout_s=_queue_timeout(headers, min(model.admission.queue_timeout_s, request_timeout_s)),
        weight=principal.weight,
        priority=max(principal.priority, generation.priority),
    )


def _queue_timeout(headers: Mapping[str, str], longest: float) -> float:
    """The model's queue timeout, or a shorter one asked for in the X-Queue-Timeout header."""
    raw = headers.get(QUEUE_TIMEOUT_HEADER)
    if raw is None:
        return longest
    try:
        asked = float(raw)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked <= 0:
        raise InvalidRequest(
            f"the {QUEUE_TIMEOUT_HEADER} header must be a positive number of seconds",
            param=QUEUE_TIMEOUT_HEADER,
        )
    return min(asked, longest)
