"""Development tooling, not shipped in the production package: local Tansu, Redis and LLM
servers for the tests, the benchmarks and ``make demo``. Run from a source checkout."""
