"""Admission: the bounded per-model queue in front of each engine (pure state + async wrapper)."""
