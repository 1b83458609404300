"""What the tests share: reading SSE, waiting on a condition, checking OpenAI errors, a client."""
