"""What the engine test modules ask for: a JSON schema and a tool, the same in process and
through `vllm serve`."""

from __future__ import annotations

from typing import Any

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def weather_call(model: str, tool_choice: Any) -> dict[str, Any]:
    """A greedy chat request for the weather tool, as the SDK's keyword arguments."""
    return dict(
        model=model,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        max_tokens=60,
        temperature=0,
    )
