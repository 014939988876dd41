"""The models of the cascade. Every cheap tier implements :class:`cascade.tiers.base.Tier`."""
