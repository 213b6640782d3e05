"""Continuous-batching engine: scheduling, per-row controls, sampling, detokenization."""
