"""Running recorded streams through the cascade and scoring it against gold labels."""
