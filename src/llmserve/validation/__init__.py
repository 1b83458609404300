"""Validation: the OpenAI wire schema in, a frozen ``GenerationRequest`` out."""
