"""Server-Sent Events: framing, OpenAI chunk formats, disconnect handling."""
