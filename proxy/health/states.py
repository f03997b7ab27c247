"""The states an instance can be in (SPEC section 6), and which of them take traffic."""

from __future__ import annotations

# Instance states (SPEC section 6).
UNKNOWN = "UNKNOWN"
READY = "READY"
LOADING = "LOADING"
DOWN = "DOWN"
MISMATCH = "MISMATCH"
DRAINED = "DRAINED"

#: States in which an instance may be sent traffic.
ROUTABLE_STATES = frozenset({UNKNOWN, READY})
#: States the prober saw last, which may be out of date by now: such an instance is still
#: tried as a last resort (if its circuit allows), so a server that came back between two
#: probes is never refused.
STALE_STATES = frozenset({DOWN, LOADING})

#: The state reason of an instance the config disables (`enabled: false`).
DISABLED_REASON = "disabled in the config"
