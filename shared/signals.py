"""One signal policy for every long-running command (index, watch, consume, run, serve, mcp, demo):
the first SIGTERM or SIGINT sets `stop`, so the batch in flight (or the request in flight) is finished
and made durable, and the command exits 0; a second one exits at once (130), leaving the batch in
flight to be redone next time (a replay is idempotent)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

logger = logging.getLogger(__name__)


def stop_on_signals(stop: asyncio.Event) -> None:
    """From now on, SIGTERM and SIGINT in this event loop set `stop`; a second one exits the process."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.warning("second %s: exiting without waiting for the batch in flight (it is redone next time)", name)
            os._exit(130)
        logger.info("%s: finishing the batch in flight, then exiting", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
