"""Streaming cascade inference: cheap online tiers that imitate an LLM, with learned deferral."""

__version__ = "0.1.0"
