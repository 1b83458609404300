"""A schema's validation errors as one OpenAI-style 400: the param named as the client wrote it.

Pydantic puts a union member's tag into an error's location (``messages.0.content.str``,
``prompt.list[int].0``); OpenAI and vLLM name the field (``messages.0.content``). A location
part is a member tag when the body has no such key at that point, which needs the body; without
one (FastAPI's own parameter errors), tags are recognised by their shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmserve.errors import InvalidRequest

# How pydantic-core names union members: a type (``str``, ``list[int]``, ``function-after[..]``)
# or a model class (``ContentPart``); wire field names are lower snake case.
_MEMBER_TAG = re.compile(r"^([a-z][a-z-]*\[.*\]|str|int|float|bool|none|bytes|[A-Z]\w*)$")
_NO_BODY = object()
_ABSENT = object()
_PREFIX = "Input should be "


def public_loc(loc: Sequence[int | str], body: object = _NO_BODY) -> tuple[int | str, ...]:
    """``loc`` without the union member tags and FastAPI's leading ``body``."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    kept: list[int | str] = []
    here = body
    for part in parts:
        if here is _NO_BODY:
            if not (isinstance(part, str) and _MEMBER_TAG.match(part)):
                kept.append(part)
            continue
        child = _child(here, part)
        if child is not _ABSENT:
            kept.append(part)
            here = child
        elif isinstance(here, Mapping) and isinstance(part, str) and not _MEMBER_TAG.match(part):
            kept.append(part)  # a missing field: the rest of the location is below it
            here = _NO_BODY
        # else: a member tag, which names no place in the body
    return tuple(kept)


def _child(here: object, part: int | str) -> object:
    if isinstance(here, Mapping):
        return here.get(part, _ABSENT)
    if isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
        return here[part]
    return _ABSENT


def invalid_request(errors: Iterable[Mapping[str, Any]], body: object = _NO_BODY) -> InvalidRequest:
    """One 400 for a schema's errors: the first field's problem, at the deepest place its union
    members reached, their messages joined (``a valid string or a valid list``)."""
    found = [(public_loc(e.get("loc", ()), body), e) for e in errors]
    if not found:
        return InvalidRequest("invalid request", code="invalid_value")
    if found[0][1].get("type") == "json_invalid":
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    field = found[0][0][:1]
    same_field = [(loc, e) for loc, e in found if loc[:1] == field]
    deepest = max(len(loc) for loc, _ in same_field)
    at = next(loc for loc, _ in same_field if len(loc) == deepest)
    messages = list(
        dict.fromkeys(str(e.get("msg", "invalid value")) for loc, e in same_field if loc == at)
    )
    param = ".".join(map(str, at)) or None
    message = f"{param or 'body'}: {_joined(messages)}"
    others = {loc for loc, _ in found if loc[: len(at)] != at and at[: len(loc)] != loc}
    if others:
        message += f" (and {len(others)} more problem{'s' if len(others) > 1 else ''})"
    return InvalidRequest(message, param=param, code="invalid_value")


def _joined(messages: list[str]) -> str:
    if len(messages) > 1 and all(m.startswith(_PREFIX) for m in messages):
        return _PREFIX + " or ".join(m[len(_PREFIX) :] for m in messages)
    return "; ".join(messages)
