"""mindeye-viewer: subscribe to a realtime service's results and serve the live page."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

import zmq

from mindeye.cli import plain_command
from mindeye.protocol import RESULTS_ENDPOINT, CurveClient, ProtocolError, Result, recv, result_subscriber
from realtime.viewer.server import LiveViewer

log = logging.getLogger("realtime.viewer")

EPILOG = """\
The page (http://HOST:PORT/) shows one card per decoded trial, newest first: the reconstruction (when the service
runs a generator) and low-level image, the image actually seen (with --stimuli), the top-k candidates with the seen one
marked (score: cosine similarity of the predicted CLIP embedding), flags, and a warning when the seen
image is not a candidate; session counts, the top-1 hit rate among trials whose seen image was a
candidate (the service says which: realtime/hits.py), end-to-end latency p50/p95 and a per-stage
latency plot with run boundaries; the counters under "details".
It loads no external asset, so it works in an offline scanner room.

Like any ZeroMQ subscriber it sees only results published after it connected.
The status line shows this relay's counters (received, shown, malformed, ...).

Examples:
  mindeye-viewer                                  # service on this machine
  mindeye-viewer --results tcp://gpu-host:5556 --stimuli /data/nsd_stimuli.hdf5 \\
      --curve-secret keys/viewer.key_secret --curve-server-key keys/service.key --host 0.0.0.0
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mindeye-viewer", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Live web viewer of a MindEye2 realtime service: subscribes to its result stream and "
                    "serves a page that updates as trials are decoded.")
    parser.add_argument("--results", default=RESULTS_ENDPOINT, metavar="ENDPOINT",
                        help=f"the service's result PUB endpoint (default {RESULTS_ENDPOINT})")
    parser.add_argument("--stimuli", type=Path, metavar="PATH",
                        help="NSD stimulus brick (nsd_stimuli.hdf5) to show the seen image and the candidates; "
                             "without it they appear as image ids")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface the web page listens on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8080, help="web page port (default 8080; 0 picks a free one)")
    parser.add_argument("--history", type=int, default=200, help="results kept and shown (default 200)")
    parser.add_argument("--title", default="MindEye2 live", help="page title")
    parser.add_argument("--session", metavar="ID", help="show only this session's results (default: all)")
    parser.add_argument("--curve-secret", type=Path, metavar="PATH",
                        help="this viewer's CURVE .key_secret file, when the service publishes with CURVE")
    parser.add_argument("--curve-server-key", type=Path, metavar="PATH",
                        help="the service's CURVE public .key file (with --curve-secret)")
    return parser


def relay(socket: zmq.Socket, viewer: LiveViewer, stop: threading.Event, *, session: str | None = None,
          source: str = "") -> None:
    """Show every result from `socket` on `viewer` until `stop` is set; the relay's counters go to its
    status line. Malformed messages are counted and logged, never fatal."""
    counts = {"source": source, "received": 0, "shown": 0, "other_sessions": 0, "other_messages": 0,
              "malformed": 0}
    viewer.set_status(counts)
    while not stop.is_set():
        try:
            message = recv(socket, timeout_ms=200)
        except ProtocolError as error:
            counts["malformed"] += 1
            log.warning("malformed message on %s: %s", source, error)
            viewer.set_status(counts)
            continue
        if message is None:
            continue
        if not isinstance(message, Result):
            counts["other_messages"] += 1
        elif session is not None and message.session != session:
            counts["received"] += 1
            counts["other_sessions"] += 1
        else:
            counts["received"] += 1
            counts["shown"] += 1
            viewer.show(message)
        viewer.set_status(counts)


@plain_command("mindeye-viewer", ports="pass --port 8081 (--port 0 picks a free one)")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.curve_secret is None) != (args.curve_server_key is None):
        parser.error("--curve-secret and --curve-server-key go together")
    if args.history < 1:
        parser.error(f"--history must be >= 1, got {args.history}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stimuli = None
    if args.stimuli is not None:
        from mindeye.nsd import StimulusBrick  # h5py and nibabel load only when needed
        stimuli = StimulusBrick(args.stimuli)
    curve = None if args.curve_secret is None else CurveClient(args.curve_secret, args.curve_server_key)

    viewer = LiveViewer(args.host, args.port, stimuli=stimuli, history=args.history, title=args.title)
    context = zmq.Context()
    socket = result_subscriber(context, args.results, curve=curve)
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):  # also when started in the background
        signal.signal(signal_number, lambda *_: stop.set())
    viewer.start()
    log.info("showing results from %s at %s (Ctrl-C stops)", args.results, viewer.url)
    try:
        relay(socket, viewer, stop, session=args.session, source=args.results)
    finally:
        viewer.stop()
        socket.close()
        context.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
