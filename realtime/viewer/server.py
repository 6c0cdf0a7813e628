"""LiveViewer: a small HTTP server that shows the service's decoded trials in a browser, live.

Routes (GET):
  /                             the page (static/index.html + viewer.js + viewer.css; no external asset)
  /events                       Server-Sent Events. On connect: `hello` {title, history, instance, stimuli,
                                fd_threshold_mm}, every retained `result` (oldest first), a `summary`, the
                                retained head motion as one `motion` event, the last `status`; then each new
                                result (+ the summary after it), each volume's motion and each status as they come
  /results.json                 {"title", "history", "stimuli", "summary", "status", "results": [...]}, oldest first.
                                Images are not inlined: a result carries `image_url` / `lowlevel_url`
                                (null when absent), which serve its PNGs while it is retained
  /result/<n>/image.png         the reconstruction of retained result number n (404 once evicted)
  /result/<n>/lowlevel.png      its low-level image
  /stimulus/<image_id>.png      the stimulus from the NSD brick (404 without a brick or for an id out of range)
  /status.json                  the last `set_status` dict
  /motion.json                  {"fd_threshold_mm", "summary", "points": [...]}: the retained volumes' motion

Head motion (protocol 1.3): `show_motion(volume)` adds one point per volume - its run, index, framewise
displacement and 6 parameters, `over` when FD exceeds `fd_threshold_mm` - to a bounded history
(MOTION_HISTORY) and to a per-session summary (volumes, over the threshold, largest FD); the page plots
FD per volume and marks those over the threshold. A `motion` event's data is {"points": [...],
"summary": {...}, "snapshot"}: on connect all retained points (snapshot true: they replace the page's),
then one point per volume (snapshot false: added).

Results are numbered `n` = 0, 1, 2, ... in the order `show` received them. `show` never waits for a
browser: each connected browser has a bounded queue; when it overflows (a browser that does not read)
its updates are dropped and, once it reads again, it is sent the retained history afresh.
"""
from __future__ import annotations

import bisect
import html
import json
import logging
import math
import queue
import re
import secrets
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mindeye.protocol import Result, Volume
from realtime.decoder import encode_png
from realtime.hits import Top1Tally, result_hit
from realtime.latency import FD_THRESHOLD_MM

if TYPE_CHECKING:
    from mindeye.nsd import StimulusBrick

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {"viewer.js": "text/javascript; charset=utf-8", "viewer.css": "text/css; charset=utf-8"}
CLIENT_QUEUE_EVENTS = 256  # updates queued per browser; beyond this they are dropped until it catches up
STIMULUS_CACHE_PNGS = 128  # NSD stimuli are 425x425: ~200 kB of PNG each
MOTION_HISTORY = 4096  # volumes whose motion is kept: a session of 12 NSD runs is 2712
KEEPALIVE_S = 15.0  # an SSE comment this often finds dead connections and keeps proxies from closing them
_RESULT_IMAGE = re.compile(r"/result/(\d{1,18})/(image|lowlevel)\.png")
_STIMULUS = re.compile(r"/stimulus/(\d{1,18})\.png")


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One Server-Sent Event; compact JSON holds no newline, so `data` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default) on an ascending list."""
    if not sorted_values:
        return None
    position = q / 100 * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class _Tally:
    """Running counts over the current session's results (a new session starts them afresh).
    Latency is over decoded (not skipped) trials; the top-1 hit rate is realtime.hits's."""

    session: str | None = None
    run: int | None = None
    trials: int = 0
    skipped: int = 0
    late: int = 0
    top1: Top1Tally = field(default_factory=Top1Tally)
    end_to_end_ms: list[float] = field(default_factory=list)  # ascending

    def add(self, result: Result) -> None:
        self.run = result.run
        self.trials += 1
        self.late += "late" in result.flags
        self.top1.add(result_hit(result))
        if "skipped" in result.flags:
            self.skipped += 1
            return
        if "end_to_end" in result.timings_ms:
            bisect.insort(self.end_to_end_ms, result.timings_ms["end_to_end"])

    def as_dict(self) -> dict:
        return {"session": self.session, "run": self.run, "trials": self.trials, "skipped": self.skipped,
                "late": self.late, "top1_countable": self.top1.countable, "top1_hits": self.top1.hits,
                "top1_rate": self.top1.rate, "top1_text": self.top1.format(),
                "end_to_end_p50_ms": _percentile(self.end_to_end_ms, 50),
                "end_to_end_p95_ms": _percentile(self.end_to_end_ms, 95)}


@dataclass
class _MotionTally:
    """Head motion over the current session's volumes (a new session starts it afresh)."""

    session: str | None = None
    volumes: int = 0
    over: int = 0
    fd_max_mm: float = 0.0

    def as_dict(self) -> dict:
        return {"session": self.session, "volumes": self.volumes, "over": self.over, "fd_max_mm": self.fd_max_mm}


@dataclass(frozen=True)
class _Shown:
    """A retained result: its JSON form (PNG URLs instead of bytes), its PNGs, its SSE event."""

    n: int
    fields: dict
    pngs: dict[str, bytes]  # "image" / "lowlevel" -> PNG
    event: bytes


def _shown(result: Result, n: int) -> _Shown:
    pngs = {kind: bytes(png) for kind, png in (("image", result.image_png), ("lowlevel", result.lowlevel_png))
            if png is not None}  # bytes(): a received frame's memory is not ours to keep
    fields = {"n": n, "session": result.session, "run": result.run, "trial": result.trial,
              "image_id": result.image_id, "image_is_candidate": result.image_is_candidate,
              "top1_hit": result_hit(result),  # computed here, once (realtime.hits), not again in the page
              "volume_index": result.volume_index,
              "embedding_norm": result.embedding_norm,
              "top_k": [{"image_id": r.image_id, "score": r.score} for r in result.top_k],
              "timings_ms": dict(result.timings_ms), "flags": list(result.flags),
              "sent_unix_s": result.envelope.sent_unix_s,
              "image_url": f"/result/{n}/image.png" if "image" in pngs else None,
              "lowlevel_url": f"/result/{n}/lowlevel.png" if "lowlevel" in pngs else None}
    return _Shown(n, fields, pngs, _sse("result", fields, event_id=n))


class _Client:
    """One connected browser: a bounded queue of encoded events (None: stop), and whether it overflowed."""

    def __init__(self, connection: socket.socket, capacity: int):
        self.connection = connection
        self.events: queue.Queue[bytes | None] = queue.Queue(capacity)
        self.overflowed = False

    def offer(self, event: bytes | None) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.overflowed = True

    def close(self) -> None:
        """Wake the handler and unblock a write stuck on a browser that does not read."""
        self.offer(None)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the browser


class _PngCache:
    """A small thread-safe LRU of PNG bytes by key."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._pngs: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            png = self._pngs.get(key)
            if png is not None:
                self._pngs.move_to_end(key)
            return png

    def put(self, key: int, png: bytes) -> None:
        with self._lock:
            self._pngs[key] = png
            self._pngs.move_to_end(key)
            while len(self._pngs) > self.capacity:
                self._pngs.popitem(last=False)


class LiveViewer:
    """Serves the live page and pushes each `show`n result to every connected browser.

    `show` and `set_status` are thread-safe and never wait on a browser (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, stimuli: StimulusBrick | None = None,
                 history: int = 200, title: str = "MindEye2 live", fd_threshold_mm: float = FD_THRESHOLD_MM):
        if not 0 <= port <= 65535:
            raise ValueError(f"LiveViewer: port must be in 0..65535 (0 picks a free one), got {port}")
        if history < 1:
            raise ValueError(f"LiveViewer: history must be >= 1 result, got {history}")
        if not fd_threshold_mm > 0:
            raise ValueError(f"LiveViewer: fd_threshold_mm must be > 0 mm, got {fd_threshold_mm}")
        self.host, self.port, self.stimuli, self.history, self.title = host, port, stimuli, history, title
        self.fd_threshold_mm = float(fd_threshold_mm)
        self.instance = secrets.token_hex(8)  # lets a page tell a restarted viewer from a reconnect
        self._lock = threading.Lock()  # guards everything below that show/set_status/handlers share
        self._shown: deque[_Shown] = deque(maxlen=history)
        self._next_n = 0
        self._tally = _Tally()
        self._motion: deque[dict] = deque(maxlen=MOTION_HISTORY)
        self._motion_tally = _MotionTally()
        self._status: dict = {}
        self._clients: set[_Client] = set()
        self._stopping = False
        self._stimulus_pngs = _PngCache(STIMULUS_CACHE_PNGS)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- service side --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://host:port/ with the port actually bound."""
        if self._server is None:
            raise RuntimeError("LiveViewer.url: the viewer is not started; call start() first")
        return f"http://{self.host}:{self._server.server_address[1]}/"

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("LiveViewer.start: already started")
        try:
            server = ThreadingHTTPServer((self.host, self.port), _Handler)
        except OSError as error:
            raise OSError(f"LiveViewer: cannot listen on {self.host}:{self.port}: {error}") from error
        server.daemon_threads = True
        server.viewer = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="live-viewer", daemon=True)
        self._thread.start()
        log.info("live viewer at %s", self.url)

    def stop(self) -> None:
        """Close every browser's stream and the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            self._stopping = True  # a stream still starting must not register now
            clients, self._clients = list(self._clients), set()
        for client in clients:
            client.close()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None
        self._stopping = False

    def show(self, result: Result) -> None:
        """Retain `result` (the last `history`) and queue it for every connected browser."""
        if not isinstance(result, Result):
            raise TypeError(f"LiveViewer.show: expected a mindeye.protocol.Result, got {type(result).__name__}")
        with self._lock:  # one lock for numbering and queueing, so every browser gets results in order
            shown = _shown(result, self._next_n)
            self._next_n += 1
            self._shown.append(shown)
            if result.session != self._tally.session:
                self._tally = _Tally(session=result.session)
            self._tally.add(result)
            update = shown.event + _sse("summary", self._tally.as_dict())
            for client in self._clients:
                client.offer(update)

    def show_motion(self, volume: Volume) -> None:
        """Plot `volume`'s framewise displacement (it must carry `motion`) and flag it over the threshold."""
        if not isinstance(volume, Volume) or volume.motion is None:
            raise TypeError("LiveViewer.show_motion: expected a mindeye.protocol.Volume carrying motion")
        motion = volume.motion
        point = {"session": volume.session, "run": volume.run, "index": volume.index, "fd_mm": motion.fd_mm,
                 "params": list(motion.params_6), "over": motion.fd_mm > self.fd_threshold_mm}
        with self._lock:
            if volume.session != self._motion_tally.session:
                self._motion_tally = _MotionTally(session=volume.session)
            tally = self._motion_tally
            tally.volumes += 1
            tally.over += point["over"]
            tally.fd_max_mm = max(tally.fd_max_mm, motion.fd_mm)
            self._motion.append(point)
            event = _sse("motion", {"points": [point], "summary": tally.as_dict(), "snapshot": False})
            for client in self._clients:
                client.offer(event)

    def set_status(self, status: dict) -> None:
        """Show `status` (JSON-able counters) in the page's status line."""
        if not isinstance(status, dict):
            raise TypeError(f"LiveViewer.set_status: expected a dict, got {type(status).__name__}")
        try:
            status = json.loads(json.dumps(status))  # a copy: the caller's later changes stay out
        except (TypeError, ValueError) as error:
            raise TypeError(f"LiveViewer.set_status: status must be JSON-able: {error}") from None
        event = _sse("status", status)
        with self._lock:
            self._status = status
            for client in self._clients:
                client.offer(event)

    def backlogs(self) -> list[int]:
        """Events queued for each connected browser (each at most CLIENT_QUEUE_EVENTS)."""
        with self._lock:
            return [client.events.qsize() for client in self._clients]

    # ---- what the handlers read ----------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        """hello, the retained results, the summary and the status, as one SSE chunk. Call holding the lock."""
        hello = _sse("hello", {"title": self.title, "history": self.history, "instance": self.instance,
                               "stimuli": self.stimuli is not None, "fd_threshold_mm": self.fd_threshold_mm})
        motion = _sse("motion", {"points": list(self._motion), "summary": self._motion_tally.as_dict(),
                                 "snapshot": True})
        return b"".join([hello, *(shown.event for shown in self._shown), _sse("summary", self._tally.as_dict()),
                         motion, _sse("status", self._status)])

    def _results_json(self) -> dict:
        with self._lock:
            return {"title": self.title, "history": self.history, "stimuli": self.stimuli is not None,
                    "summary": self._tally.as_dict(), "status": self._status,
                    "results": [shown.fields for shown in self._shown]}

    def _motion_json(self) -> dict:
        with self._lock:
            return {"fd_threshold_mm": self.fd_threshold_mm, "summary": self._motion_tally.as_dict(),
                    "points": list(self._motion)}

    def _status_json(self) -> dict:
        with self._lock:
            return self._status

    def _result_png(self, n: int, kind: str) -> bytes | None:
        with self._lock:
            if not self._shown or not self._shown[0].n <= n <= self._shown[-1].n:
                return None
            return self._shown[n - self._shown[0].n].pngs.get(kind)

    def _stimulus_png(self, image_id: int) -> bytes | None:
        if self.stimuli is None or image_id >= len(self.stimuli):
            return None
        png = self._stimulus_pngs.get(image_id)
        if png is None:
            png = encode_png(self.stimuli[image_id][0])
            self._stimulus_pngs.put(image_id, png)
        return png

    def _stream(self, connection: socket.socket, write: Callable[[bytes], None]) -> None:
        """Serve one /events connection until the browser leaves or the viewer stops."""
        client = _Client(connection, CLIENT_QUEUE_EVENTS)
        with self._lock:
            if self._stopping:
                return
            self._clients.add(client)
            snapshot = self._snapshot()
        try:
            write(snapshot)
            while True:
                if client.overflowed:  # it missed updates: drop the stale queue, send the current state
                    client.overflowed = False
                    while not client.events.empty():
                        if client.events.get_nowait() is None:
                            return
                    with self._lock:
                        snapshot = self._snapshot()
                    write(snapshot)
                try:
                    event = client.events.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    event = b": keepalive\n\n"
                if event is None:
                    return
                write(event)
        except OSError:  # the browser left (BrokenPipe, ConnectionReset) or stop() shut the socket
            pass
        finally:
            with self._lock:
                self._clients.discard(client)


class _Handler(BaseHTTPRequestHandler):
    server_version = "MindEyeLiveViewer/1"

    @property
    def viewer(self) -> LiveViewer:
        return self.server.viewer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
            self._send(page.replace("{{title}}", html.escape(self.viewer.title)).encode(), "text/html; charset=utf-8")
        elif path.startswith("/static/") and path[len("/static/"):] in _STATIC_TYPES:
            name = path[len("/static/"):]
            self._send((STATIC_DIR / name).read_bytes(), _STATIC_TYPES[name])
        elif path == "/events":
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.viewer._stream(self.connection, self._write)
        elif path == "/results.json":
            self._send_json(self.viewer._results_json())
        elif path == "/status.json":
            self._send_json(self.viewer._status_json())
        elif path == "/motion.json":
            self._send_json(self.viewer._motion_json())
        elif match := _RESULT_IMAGE.fullmatch(path):
            self._send_png(self.viewer._result_png(int(match[1]), match[2]), "no-cache")
        elif match := _STIMULUS.fullmatch(path):
            self._send_png(self.viewer._stimulus_png(int(match[1])), "max-age=3600")
        else:
            self.send_error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _send(self, body: bytes, content_type: str, cache: str = "no-cache") -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, value: Any) -> None:
        self._send(json.dumps(value).encode(), "application/json")

    def _send_png(self, png: bytes | None, cache: str) -> None:
        if png is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such image (evicted, out of range, or no stimulus brick)")
        else:
            self._send(png, "image/png", cache)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


