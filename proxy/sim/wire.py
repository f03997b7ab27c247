"""How a simulated server's answers go out on the wire: whole JSON bodies and SSE
streams, paced by `chunk_delay` and reasoning, cut, stalled or garbled by the stream
faults (proxy.sim.faults, proxy.sim.responses.faulty_events)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
from aiohttp import web

from proxy.sim.faults import Faults
from proxy.sim.info import InfoServer
from proxy.sim.responses import (
    DONE,
    JSON_HEADERS,
    RATE_LIMIT,
    SSE_HEADERS,
    End,
    faulty_events,
    ratelimit_headers,
)
from proxy.sim.server import forever


class WireServer(InfoServer):
    """Writing answers for `proxy.sim.simulator.Simulator`."""

    #: Seconds between stream events.
    chunk_delay: float

    def _headers(self, faults: Faults, base: dict[str, str]) -> dict[str, str]:
        if not faults.ratelimit_headers:
            return base
        return {**base, **ratelimit_headers(max(0, RATE_LIMIT - self.stats.requests), "1s")}

    async def _send_json(self, request: web.BaseRequest, faults: Faults, body: bytes) -> web.StreamResponse:
        headers = self._headers(faults, JSON_HEADERS)
        if faults.die_after is None and faults.stall_after is None:
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)  # StreamResponse sends the headers right away
        if faults.die_after is not None:
            await resp.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.abort()
            return resp
        await forever()
        return resp  # pragma: no cover - forever only ends by cancellation

    async def _stream(
        self,
        request: web.BaseRequest,
        faults: Faults,
        events: list[bytes],
        head: bytes,
        tail: bytes,
        pieces: Sequence[str],
        finish_ev: bytes,
        usage_ev: bytes | None,
        thoughts: Sequence[bytes] = (),
    ) -> web.StreamResponse:
        dumps = orjson.dumps
        end = End.CLEAN
        # Reasoning events, then the answer's: the stream faults count both as pieces.
        paced = range(len(events) + 1, len(events) + len(thoughts) + 1)
        bodies = [*thoughts, *(head + dumps(p) + tail for p in pieces)]
        if not faults.shapes_stream:
            events.extend(bodies)
            events.append(finish_ev)
            if usage_ev is not None:
                events.append(usage_ev)
            events.append(DONE)
        else:
            end = faulty_events(faults, events, bodies, finish_ev, usage_ev)

        resp = web.StreamResponse(headers=self._headers(faults, SSE_HEADERS))
        try:
            await resp.prepare(request)
            if self.chunk_delay > 0 or thoughts:
                # The first reasoning event at once, the next ones (and the answer after the
                # last) REASONING_STEP_S apart: the answer begins `reasoning` seconds in.
                step = faults.reasoning / len(thoughts) if thoughts else 0.0
                await self._paced(resp, events, paced, step)
            elif events:
                # No delay: one write (one syscall) for the whole stream.
                await resp.write(b"".join(events))
            if end is End.DIE:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if end is End.STALL:
                await forever()
            await resp.write_eof()
        except asyncio.CancelledError:
            self.stats.aborted += 1
            raise
        except ConnectionError:
            self.stats.aborted += 1  # the client went away mid-stream: nothing to report
            return resp
        self.stats.completed_streams += 1
        return resp

    async def _paced(self, resp: web.StreamResponse, events: list[bytes], paced: range,
                     step: float) -> None:
        """Write `events` `chunk_delay` apart, and the `paced` ones (reasoning) `step` apart;
        what has no pause before it goes out with the events before it, in one write."""
        delay = self.chunk_delay
        ready: list[bytes] = []
        for i, ev in enumerate(events):
            pause = max(delay if i else 0.0, step if i in paced else 0.0)
            if pause > 0:
                if ready:
                    await resp.write(b"".join(ready))
                    ready.clear()
                await asyncio.sleep(pause)
            ready.append(ev)
        if ready:
            await resp.write(b"".join(ready))
