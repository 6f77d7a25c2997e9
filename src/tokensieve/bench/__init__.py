"""Benchmarks that measure tokensieve beside a baseline in the same run."""
