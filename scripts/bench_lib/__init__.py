"""Helpers of scripts/bench.py: processes, wrk, the asyncio load client, the result table."""
