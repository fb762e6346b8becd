"""The stdout sink delivers every line it counts, even when signals interrupt its writes to a full pipe."""

import json
import os
import signal
import subprocess
import sys
import time

BATCHES, PER_BATCH = 40, 200

# A child agent's stdout sink under PYTHONUNBUFFERED (as in the image), emitting batches of ~100 KB into a
# pipe its reader drains slowly, while signals (handled, as the agent handles SIGTERM) keep landing.
CHILD = f"""
import os, signal, sys
from datetime import UTC, datetime
from tapio_core.occurrence import KernelClock, Occurrence
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

signal.signal(signal.SIGUSR1, lambda *_: None)
plugins = load_plugins({{"stdout"}})
[sink] = Pipeline.open_sinks(plugins, ["stdout"], SinkOptions(data_dir="."), {{}})
pipeline = Pipeline(plugins, [], [sink], KernelClock(offset_ns=0))
print("ready", file=sys.stderr, flush=True)
for b in range({BATCHES}):
    pipeline.emit([Occurrence(id=f"01JSTDOUT{{b:08d}}{{n:09d}}", timestamp=datetime(2026, 1, 1, tzinfo=UTC),
                              type="kernel.network.connection_refused", severity="warning", outcome="failure",
                              data={{"comm": "x" * 400, "n": n}})
                   for n in range({PER_BATCH})])
pipeline.close()
os.close(1)  # the reader's end of file; the child stays (a signal must not find it gone) until stdin closes
print(sink.delivered, sink.failed, file=sys.stderr, flush=True)
sys.stdin.read()
"""


def test_signals_during_writes_to_a_full_pipe_lose_no_line(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=tmp_path, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert child.stderr.readline() == b"ready\n"
        lines = []
        while True:
            chunk = child.stdout.readline()
            if not chunk:
                break
            lines.append(chunk)
            if len(lines) % 50 == 0:  # the pipe fills while the child writes; a signal lands mid-write
                child.send_signal(signal.SIGUSR1)
                time.sleep(0.002)
        delivered, failed = map(int, child.stderr.readline().split())
        child.stdin.close()
        assert child.wait(60) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert (delivered, failed) == (BATCHES * PER_BATCH, 0)
    assert len(lines) == delivered
    assert len({json.loads(line)["id"] for line in lines}) == delivered
