"""The OpenAI wire format (the request schema, the error body), below every layer that speaks it."""
