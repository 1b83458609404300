"""Per-key rate limits: requests and tokens per minute, concurrent requests."""
