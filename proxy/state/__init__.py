"""State shared between replicas of the proxy (`state: {url: redis://...}`): the merge
rules (merge) and the link to Redis (link). Without `state.url` nothing here runs and each
process keeps its own state, as before."""

from proxy.state.link import SharedState

__all__ = ["SharedState"]
