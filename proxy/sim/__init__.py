"""Simulated model servers for the tests, the demo and the benchmarks (not product code)."""
