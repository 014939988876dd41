"""Event → tiers → decision: each stage runs one tier and its deferral policy."""
