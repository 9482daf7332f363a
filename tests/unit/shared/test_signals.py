"""The one signal policy of every long-running command, in a real process: the first SIGTERM or SIGINT
lets the work in flight finish and the process exit 0; a second one exits at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

SCRIPT = """
import asyncio, logging, sys
from shared.signals import stop_on_signals

logging.basicConfig(level="INFO")

async def main():
    stop = asyncio.Event()
    stop_on_signals(stop)
    print("ready", flush=True)
    await stop.wait()
    print("finishing", flush=True)
    await asyncio.sleep(float(sys.argv[1]))  # the batch in flight
    print("done", flush=True)

asyncio.run(main())
"""


def start(batch_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(batch_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_finishes_the_work_in_flight_and_exits_0(first: signal.Signals) -> None:
    proc = start(batch_s=0.5)
    proc.send_signal(first)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "finishing\ndone\n"
    assert f"{first.name}: finishing the batch in flight" in err


def test_a_second_signal_exits_at_once_without_waiting() -> None:
    proc = start(batch_s=60)
    assert proc.stdout is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "finishing\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - started < 10
    assert "done" not in out and "second SIGINT: exiting without waiting" in err
