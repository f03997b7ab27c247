"""failover-proxy: an OpenAI-compatible proxy that routes by a scored plan and fails over."""

__version__ = "0.1.0"
