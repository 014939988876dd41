"""Replay: re-run the cascade offline over a recorded range with recorded LLM answers, sweep the
deferral settings, recommend one for a target, and optionally make it live (``cascade replay``)."""
