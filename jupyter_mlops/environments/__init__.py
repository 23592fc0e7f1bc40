"""Environments: definitions (environment.yml), locks, and installed prefixes (see docs/kernels.md)."""
