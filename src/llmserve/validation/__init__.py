"""Validation: the OpenAI wire schema in, a frozen ``ValidatedRequest`` out."""
