"""ZeroMQ sockets for the wire protocol: who binds, who connects, sending, receiving, and CURVE.

Volumes: the scanner side is a DEALER that connects, the realtime service a ROUTER that binds and
answers each message with an `ack` addressed to the peer that sent it. Acks never gate sending
(no lock-step as in REQ/REP or Pyneal's PAIR), so a lost ack cannot stall a run.
Results: the service is an XPUB that binds (a PUB that also hears subscriptions, so a restarted
service can hold what it recovered until a viewer is back; a slow viewer loses results, it never
slows the service); viewers are SUBs that connect.

Only loopback endpoints may be bound without CURVE (`allow_insecure` overrides): anything else would
let anyone on the network send volumes and read results. The ROUTER drops a connection whose frame
exceeds `MAX_FRAME_BYTES` before reading it (ZMQ_MAXMSGSIZE), and `recv_frames` keeps a bounded
number of frames of a message, so no message can make the receiver hold more than that.

CURVE (encryption and client authentication) is for scanner and GPU hosts on different machines:
the binding side is the CURVE server and admits only client public keys found in one folder.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mindeye.errors import ConfigValueError
from mindeye.protocol.messages import MAX_FRAME_BYTES, MAX_FRAMES, Message, ProtocolError, decode, encode

VOLUMES_ENDPOINT = "tcp://127.0.0.1:5555"
RESULTS_ENDPOINT = "tcp://127.0.0.1:5556"
_HEARTBEAT_MS, _HEARTBEAT_TIMEOUT_MS = 1000, 5000  # drop a dead peer's connection (a cable pulled) within 5 s


# ---- CURVE -------------------------------------------------------------------------------------------

def create_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write `name.key` (public, to hand to the other side) and `name.key_secret` (keep on this host)
    in `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def load_keypair(secret_file: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) keys, Z85, from a `.key_secret` file written by `create_keypair`."""
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file}: holds no secret key; pass the '.key_secret' file, not the public '.key'")
    return public, secret


class CurveServer:
    """The binding side's CURVE: this host's key pair plus a ZAP authenticator thread on `context` that
    admits clients whose public key is a `*.key` file in `allowed_clients_dir` (read once, here).
    One per context: share it between the volume receiver and the result publisher; call `stop()`."""

    def __init__(self, context: zmq.Context, secret_key_file: str | Path, allowed_clients_dir: str | Path):
        self.public_key, self.secret_key = load_keypair(secret_key_file)
        allowed = sorted(Path(allowed_clients_dir).glob("*.key"))
        if not allowed:
            raise FileNotFoundError(f"{allowed_clients_dir}: no client public keys (*.key); every client "
                                    f"would be refused")
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(allowed_clients_dir))

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE server; call before bind."""
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()


@dataclass(frozen=True)
class CurveClient:
    """The connecting side's CURVE: its own key pair and the server's public key."""

    secret_key_file: Path
    server_public_key_file: Path

    @classmethod
    def from_settings(cls, secret_key_file, server_public_key_file) -> CurveClient | None:
        """A command's `curve` settings: both set -> a client; neither -> None (plain TCP); one -> refused."""
        keys = (secret_key_file, server_public_key_file)
        if keys == (None, None):
            return None
        if None in keys:
            raise ConfigValueError("CURVE needs both curve.secret_key_file and curve.server_public_key_file")
        return cls(Path(keys[0]), Path(keys[1]))

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client of that server; call before connect."""
        socket.curve_publickey, socket.curve_secretkey = load_keypair(self.secret_key_file)
        socket.curve_serverkey, _ = zmq.auth.load_certificate(self.server_public_key_file)


# ---- sockets for each role ---------------------------------------------------------------------------

def volume_sender(context: zmq.Context, endpoint: str = VOLUMES_ENDPOINT, *, curve: CurveClient | None = None,
                  send_timeout_ms: int = 1000, linger_ms: int = 2000) -> zmq.Socket:
    """The scanner side's DEALER, connected. Messages queue while the receiver is away (up to the
    high-water mark, then `send` raises zmq.Again after `send_timeout_ms`); on close, unsent messages
    get `linger_ms` to leave."""
    socket = context.socket(zmq.DEALER)
    socket.sndtimeo, socket.linger = send_timeout_ms, linger_ms
    _set_heartbeat(socket)
    if curve is not None:
        curve.apply(socket)
    socket.connect(endpoint)
    return socket


def volume_receiver(context: zmq.Context, endpoint: str = VOLUMES_ENDPOINT, *, curve: CurveServer | None = None,
                    allow_insecure: bool = False) -> zmq.Socket:
    """The realtime service's ROUTER, bound (`tcp://127.0.0.1:*` picks a free port: see `bound_endpoint`).
    Read it with `recv_frames`."""
    check_exposure(endpoint, curve, allow_insecure)
    socket = context.socket(zmq.ROUTER)
    socket.linger = 0
    socket.maxmsgsize = MAX_FRAME_BYTES  # per frame; a larger one drops the connection before it is read
    _set_heartbeat(socket)
    if curve is not None:
        curve.apply(socket)
    socket.bind(endpoint)
    return socket


def result_publisher(context: zmq.Context, endpoint: str = RESULTS_ENDPOINT, *, curve: CurveServer | None = None,
                     allow_insecure: bool = False) -> zmq.Socket:
    """The realtime service's XPUB, bound: sends like a PUB; `new_subscriptions` says who joined."""
    check_exposure(endpoint, curve, allow_insecure)
    socket = context.socket(zmq.XPUB)
    socket.linger = 0
    socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first for a topic
    if curve is not None:
        curve.apply(socket)
    socket.bind(endpoint)
    return socket


def new_subscriptions(publisher: zmq.Socket) -> int:
    """How many subscriptions reached an XPUB since the last call (never blocks)."""
    joined = 0
    while publisher.poll(0, zmq.POLLIN):
        joined += publisher.recv()[:1] == b"\x01"  # 1: subscribe, 0: unsubscribe
    return joined


class InsecureEndpointError(ConfigValueError):
    """Binding a non-loopback endpoint without CURVE."""


def check_exposure(endpoint: str, curve: object | None, allow_insecure: bool) -> None:
    """Refuse to bind a network-reachable endpoint without CURVE, unless explicitly allowed."""
    if curve is None and not allow_insecure and not is_loopback(endpoint):
        raise InsecureEndpointError(
            f"{endpoint} is reachable from the network and CURVE is off: anyone there could send volumes or "
            f"read results. Set up CURVE (docs/protocol.md, 'CURVE'), bind 127.0.0.1, or set allow_insecure=true")


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on localhost, 127.0.0.0/8, ::1 or the `lo` interface."""
    scheme, _, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*" or an interface name: every address or a real network card
        return False


def result_subscriber(context: zmq.Context, endpoint: str = RESULTS_ENDPOINT, *,
                      curve: CurveClient | None = None) -> zmq.Socket:
    """A viewer's SUB, connected and subscribed to every result (filter by session after decoding).
    Like any SUB it misses what was published before its subscription reached the publisher."""
    socket = context.socket(zmq.SUB)
    socket.linger = 0
    if curve is not None:
        curve.apply(socket)
    socket.subscribe(b"")
    socket.connect(endpoint)
    return socket


def bound_endpoint(socket: zmq.Socket) -> str:
    """The endpoint a socket last bound, with the port the OS chose for `:*`."""
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _set_heartbeat(socket: zmq.Socket) -> None:
    socket.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)


# ---- send / receive ----------------------------------------------------------------------------------

def send(socket: zmq.Socket, message: Message, *, peer: bytes | None = None) -> None:
    """Encode and send `message`; payload frames go without a copy. On a ROUTER, `peer` (the routing
    id `recv_with_peer` returned) says whom to send to."""
    is_router = socket.type == zmq.ROUTER
    if is_router != (peer is not None):
        raise ValueError("send: pass `peer` exactly when sending on a ROUTER socket")
    frames = encode(message)
    socket.send_multipart([peer, *frames] if is_router else frames, copy=False)


def recv(socket: zmq.Socket, timeout_ms: int | None) -> Message | None:
    """The next message, or None when none came within `timeout_ms` (None: wait for ever).
    Raises ProtocolError for a malformed message (which is consumed)."""
    if socket.type == zmq.ROUTER:
        raise ValueError("recv: a ROUTER socket needs recv_with_peer, which also returns the sender's routing id")
    frames = _poll_frames(socket, timeout_ms)
    return None if frames is None else decode(frames)


def recv_with_peer(socket: zmq.Socket, timeout_ms: int | None) -> tuple[bytes, Message] | None:
    """(peer routing id, message) from a ROUTER, or None on timeout. A malformed message raises
    ProtocolError with `.peer` set, so the receiver can still answer it with a rejecting ack."""
    frames = _poll_frames(socket, timeout_ms)
    if frames is None:
        return None
    peer = frames[0].bytes
    try:
        return peer, decode(frames[1:])
    except ProtocolError as error:
        error.peer = peer
        raise


def recv_frames(socket: zmq.Socket, max_frames: int) -> tuple[list[zmq.Frame], int]:
    """The next message's first `max_frames` frames (a ROUTER's peer id included) and its frame count.
    Frames past the limit are read and dropped one at a time, so no message holds more than that."""
    frames = [socket.recv(copy=False)]
    n_frames = 1
    while socket.rcvmore:
        frame = socket.recv(copy=False)
        n_frames += 1
        if len(frames) < max_frames:
            frames.append(frame)
    return frames, n_frames


def _poll_frames(socket: zmq.Socket, timeout_ms: int | None) -> list[zmq.Frame] | None:
    if socket.poll(timeout_ms, zmq.POLLIN) == 0:
        return None
    peer = 1 if socket.type == zmq.ROUTER else 0
    frames, _ = recv_frames(socket, peer + MAX_FRAMES + 1)  # one frame too many is enough for decode to refuse
    return frames
