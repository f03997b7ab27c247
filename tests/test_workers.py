"""`serve --workers N`: several processes share one port; SIGTERM stops them all."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

from tests.cluster import Cluster
from tests.conftest import chat_body


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_sim("a", "m")
        c.start_proxy([("a", "m")], "--workers", "2")
        prefixes: set[str] = set()
        # A new connection each time: the kernel spreads them over the workers listening.
        # The port answers as soon as the first worker listens; the second may take a
        # moment longer to start (a busy machine), so ask until both have answered.
        deadline = time.monotonic() + 20
        while len(prefixes) < 2 and time.monotonic() < deadline:
            request = urllib.request.Request(
                f"{c.base_url}/chat/completions", data=json.dumps(chat_body()).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
                prefixes.add(resp.headers["x-request-id"][:16])  # per-process id prefix
        assert len(prefixes) == 2, prefixes
        c.proxy.send_signal(signal.SIGTERM)
        assert c.proxy.wait(timeout=20) == 0
        assert "2 workers" in c.log()
    finally:
        c.close()
