"""Deferral: per tier, decide from the tier's confidence whether it answers or passes the event up."""
