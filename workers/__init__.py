"""Kafka consumer processes (one per tier, the LLM worker, the learner) and their CLIs."""
