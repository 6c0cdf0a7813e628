"""Sending: each run's plan, faults injected, paced, over a DEALER; the service's acks counted.

Acks never gate sending (docs/protocol.md): they are read without waiting between messages and,
at the end, for at most `ack_wait_s` until every message sent on the current connection is answered.
A sender restart (a fault) closes the connection and opens a new one with a new `Stamper`, as a
restarted process would; acks still due on the old connection are lost and count as unacked.
The schedule's clock starts once the first run is loaded; each later run is loaded when reached,
so a load slower than the gap before it makes that run's first volumes go late and catch up.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import zmq

from mindeye.errors import ServiceUnavailable
from mindeye.protocol import Ack, CurveClient, ProtocolError, Stamper, encode, recv, volume_sender
from simulators.replay.faults import Faults, apply_faults
from simulators.replay.sources import RESTART, Outgoing


class NoReceiverError(ServiceUnavailable):
    """Nothing answered the first message: no service at the endpoint, or CURVE keys it does not admit."""


class Source(Protocol):
    """Anything with runs to replay (see simulators.replay.sources)."""

    def runs(self) -> Iterator[list[Outgoing]]:
        """One list per run, in send order, read when reached."""


def parse_speed(speed: str | float) -> float | None:
    """"real" -> 1.0, "max" -> None (no waiting), a number > 0 -> that many times real time."""
    if speed == "real":
        return 1.0
    if speed == "max":
        return None
    try:
        value = float(speed)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise ValueError(f"speed must be 'real', 'max' or a number > 0, got {speed!r}")
    return value


class Pacer:
    """Waits until each message's send time: the plan's time divided by `speed` after `start()`,
    or no waiting at all when `speed` is None. `clock` and `sleep` are injectable for tests."""

    def __init__(self, speed: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.speed, self.clock, self.sleep = speed, clock, sleep
        self._t0 = clock()

    def start(self) -> None:
        self._t0 = self.clock()

    def wait_until(self, at_s: float) -> None:
        if self.speed is None:
            return
        remaining_s = self._t0 + at_s / self.speed - self.clock()
        if remaining_s > 0:
            self.sleep(remaining_s)


@dataclass
class ReplaySummary:
    """What a replay sent and what the receiver answered."""

    endpoint: str
    runs: int = 0
    sent: Counter = field(default_factory=Counter)  # message type -> messages sent
    faults: Counter = field(default_factory=Counter)  # fault -> log records
    acks: Counter = field(default_factory=Counter)  # "verdict" or "verdict:reason" -> acks
    unreadable_acks: int = 0
    unacked: int = 0
    sender_restarts: int = 0
    elapsed_s: float = 0.0
    fault_records: list[dict] = field(default_factory=list)
    fault_log: Path | None = None

    def format(self) -> str:
        def listing(counter: Counter) -> str:
            return ", ".join(f"{key} {n}" for key, n in sorted(counter.items())) or "none"

        return "\n".join([
            f"replayed {self.runs} run(s) to {self.endpoint} in {self.elapsed_s:.1f} s",
            f"  sent    {sum(self.sent.values())} messages: {listing(self.sent)}; "
            f"{self.sender_restarts} sender restart(s)",
            f"  faults  {listing(self.faults)}" + (f"  (log: {self.fault_log})" if self.fault_log else ""),
            f"  acks    {listing(self.acks)}; {self.unreadable_acks} unreadable, {self.unacked} unacked"])


class _Connection:
    """One sender process's connection: a DEALER, a Stamper, and a count of what it sent and got acked."""

    def __init__(self, context: zmq.Context, endpoint: str, curve: CurveClient | None):
        self.socket = volume_sender(context, endpoint, curve=curve)
        self.stamper = Stamper()
        self.endpoint, self.n_sent, self.n_answered = endpoint, 0, 0

    def send(self, item: Outgoing) -> None:
        if item.frames is not None:
            frames = list(item.frames)
        else:
            frames = encode(replace(item.message, envelope=self.stamper.envelope()))
        for tamper in item.tampers:
            frames = tamper(frames)
        try:
            self.socket.send_multipart(frames, copy=False)
        except zmq.Again:
            raise RuntimeError(f"{self.endpoint}: the receiver is not taking messages (the send queue is full); "
                               f"is the realtime service running there?") from None
        self.n_sent += 1

    def read_acks(self, summary: ReplaySummary, timeout_ms: int = 0) -> None:
        """Count every ack already here (waiting at most `timeout_ms` for the first)."""
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            self.n_answered += 1
            try:
                ack = recv(self.socket, 0)
            except ProtocolError:
                summary.unreadable_acks += 1
                continue
            if isinstance(ack, Ack):
                summary.acks[str(ack.verdict) + (f":{ack.reason}" if ack.reason else "")] += 1
            else:  # a message that is not an ack
                summary.unreadable_acks += 1

    def close(self, summary: ReplaySummary) -> None:
        if self.socket.closed:
            return
        self.read_acks(summary)
        summary.unacked += self.n_sent - self.n_answered
        self.socket.close()


def replay(source: Source, endpoint: str, *, faults: Faults = Faults(), seed: int = 0, speed: str | float = "max",
           context: zmq.Context | None = None, curve: CurveClient | None = None, fault_log: Path | None = None,
           ack_wait_s: float = 5.0, first_ack_wait_s: float | None = None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> ReplaySummary:
    """Stream every run of `source` to the receiver at `endpoint` with `faults` injected; write the
    fault log as JSON lines to `fault_log` (when given); return what was sent and acked. Raises
    NoReceiverError when the first message is not acked within `first_ack_wait_s` (None: no such check)."""
    pacer = Pacer(parse_speed(speed), clock, sleep)
    own_context = context is None
    context = context or zmq.Context()
    summary = ReplaySummary(endpoint, fault_log=fault_log)
    started = time.monotonic()
    if fault_log is not None:
        Path(fault_log).parent.mkdir(parents=True, exist_ok=True)
    log_file = open(fault_log, "w") if fault_log is not None else None
    connection = _Connection(context, endpoint, curve)
    try:
        for plan in source.runs():
            if summary.runs == 0:
                pacer.start()  # the schedule starts once the first run is loaded
            plan, records = apply_faults(plan, faults, seed)
            summary.runs += 1
            summary.fault_records += records
            summary.faults.update(record["fault"] for record in records)
            if log_file is not None:
                log_file.writelines(json.dumps(record) + "\n" for record in records)
                log_file.flush()
            for item in plan:
                pacer.wait_until(item.at_s)
                if item.type == RESTART:
                    connection.close(summary)
                    connection = _Connection(context, endpoint, curve)
                    summary.sender_restarts += 1
                    continue
                connection.send(item)
                summary.sent[item.type] += 1
                first = first_ack_wait_s is not None and sum(summary.sent.values()) == 1  # is anybody there?
                connection.read_acks(summary, timeout_ms=int(first_ack_wait_s * 1000) if first else 0)
                if first and connection.n_answered == 0:
                    raise NoReceiverError(f"no service answered at {endpoint} within {first_ack_wait_s:g} s: it is "
                                          f"not taking messages. Is mindeye-realtime running there (with CURVE keys "
                                          f"that admit this sender)?")
        deadline = time.monotonic() + ack_wait_s
        while connection.n_answered < connection.n_sent and time.monotonic() < deadline:
            connection.read_acks(summary, timeout_ms=max(1, int((deadline - time.monotonic()) * 1000)))
    finally:
        connection.close(summary)
        if log_file is not None:
            log_file.close()
        if own_context:
            context.term()
    summary.elapsed_s = time.monotonic() - started
    return summary
