"""Demonstration → learner → model snapshot: the cheap tiers and their policies imitate the LLM."""
