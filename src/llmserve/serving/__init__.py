"""Running a validated request on an engine, with its lifetime guaranteed."""
