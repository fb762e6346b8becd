"""What a sink plugin declares, and what the agent hands back to its hooks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import attrs


class SinkError(Exception):
    """A sink cannot work as configured; the message is one line for the user."""


def whole_writes(stream: TextIO) -> BinaryIO:
    """``sys.stdout`` or ``sys.stderr`` behind a buffered writer of its own, for a sink to write bytes to.

    Under ``python -u`` or ``PYTHONUNBUFFERED`` (the image sets it, for logs) the standard streams write
    straight to the raw file: when a signal lands during a write to a full pipe (SIGTERM while kubelet's
    log reader lags) the kernel takes part of the batch and Python drops the rest without a word. A
    buffered writer finishes short writes, so what a sink counts delivered is what the reader gets.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stream in memory (a test runner's)
        return stream.buffer
    stream.flush()
    return open(fd, "wb", closefd=False)  # the caller flushes it; the descriptor stays open


@attrs.frozen
class SinkSpec:
    """A sink as a plugin declares it in ``tapio_register_sinks``."""

    name: str
    description: str = ""
    #: An attrs class with defaults and validators, built from the config
    #: file's table named after the sink (``[file]``); None: no settings.
    config_type: type | None = None
    #: True when emit only queues (a remote sink's sender thread delivers
    #: later): the sink then keeps ``delivered``/``failed`` itself, in
    #: ``counters``, and the agent does not count a returned emit as delivered.
    delivers_later: bool = False


@attrs.frozen
class SinkOptions:
    """What the agent tells every sink, whatever its own settings."""

    data_dir: Path


@attrs.define(eq=False)
class RunningSink:
    """One chosen sink while the agent runs; passed to its hooks.

    ``state`` belongs to the sink's plugin (open files, sessions); ``config``
    is an instance of ``spec.config_type``. The agent keeps the counts.
    """

    spec: SinkSpec
    options: SinkOptions
    config: Any = None
    state: dict[str, Any] = attrs.field(factory=dict)
    plugin_name: str = ""
    delivered: int = 0
    failed: int = 0
    #: The plugin's own counts (dropped, retried, ...); `tapio status` shows them.
    counters: dict[str, int] = attrs.field(factory=dict)
    #: Occurrences waiting to be delivered, for a sink that queues (``delivers_later``); `tapio status` and
    #: the metrics show it.
    queue_depth: Callable[[], int] | None = None

    @property
    def name(self) -> str:
        return self.spec.name
