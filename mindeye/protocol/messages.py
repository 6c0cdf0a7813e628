"""The wire messages between the scanner side, the realtime service and viewers (spec: docs/protocol.md).

A message is a list of frames: frame 0 is a UTF-8 JSON object (the header), frames 1.. are raw bytes
(a volume, PNG images). Every header carries the envelope - `protocol_version`, `type`, `sender_id`,
`seq`, `sent_unix_s` - at its top level, next to the message's own fields. `encode` emits only what
`decode` accepts: both run the same checks, which raise `ProtocolError` naming the message type, the
field and what was expected.

`decode` never copies payload frames: a volume's `data` is a memoryview of the received frame, and
`Volume.array()` is a read-only numpy view of it.

Every field has a sane maximum (the `MAX_*` constants, docs/protocol.md "Limits"): whatever a message
holds, decoding it takes bounded time and memory, and the values it yields are safe to loop over,
allocate for or convert to float. Frame counts and sizes are checked before the header is parsed.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias

import numpy as np

from mindeye.motion import MOTION_PARAMS

PROTOCOL_VERSION = "1.3"  # MAJOR.MINOR: a receiver accepts any minor version of its major
PROTOCOL_MAJOR = 1
DTYPES = ("int16", "uint16", "float32", "float64")  # volume sample types; little-endian on the wire
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMING_STAGES = ("receive", "journal", "glm", "queue", "decode", "generate", "publish", "end_to_end")
RESULT_FLAGS = ("skipped", "merged", "late", "recovered")
BRIDGE_STAGES = ("seen", "read", "registered")  # 1.3: a volume's times on the scanner side, then its `sent_unix_s`

# Limits (docs/protocol.md, "Limits" gives the reasons for each value).
MAX_FRAMES = 3  # a header and at most 2 payload frames (a result with both PNGs)
MAX_HEADER_BYTES = 1 << 20  # frame 0
MAX_FRAME_BYTES = 128 << 20  # any payload frame: the largest volume, MAX_VOXELS float64 samples
MAX_DIMENSION = 4096  # voxels along each axis of a volume
MAX_VOXELS = 1 << 24  # X * Y * Z, i.e. 256^3
MAX_RUN_VOLUMES = 10_000  # volume indices 0 .. MAX_RUN_VOLUMES - 1
MAX_TRIALS = 10_000  # trial indices 0 .. MAX_TRIALS - 1, and events in one message
MAX_RUN = 9_999  # run numbers 1 .. MAX_RUN
MAX_TIME_S = 86_400.0  # acq_time_s, onset_s
MAX_DURATION_S = 600.0  # a trial's duration: the GLM's regressor grows with it (and with 1 / TR)
MIN_TR_S, MAX_TR_S = 0.1, 60.0  # the GLM samples its regressors at the TR: a tiny one would take it minutes
MAX_ABS_MM = 1e5  # affine entries: world coordinates within 100 m
MAX_ABS_UNIX_S = 1e11  # sent_unix_s: year 5138
MAX_IMAGE_ID = 2**31 - 1
MAX_TEXT = 4096  # characters of any string (label, ack detail, flag)
MAX_MOTION_MM = 500.0  # 1.3: a head translation; the bore is ~600 mm wide
MAX_FD_MM = 1e4  # 1.3: framewise displacement; 6 parameters at their limits give < 4000 mm

# Ids end up in file names (journals, logs): a safe character set rules out paths like "../x".
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# ASCII digits only (\d would take "\uff11.\uff11" as 1.1), and few: int() of 4300+ digits raises
_VERSION = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")
_INT64_MAX = 2**63 - 1  # integers must fit a signed 64-bit integer in every client language

Buffer: TypeAlias = bytes | bytearray | memoryview  # anything exposing the buffer protocol (zmq.Frame too)


class Reason(StrEnum):
    """Reason codes. The first group is raised by `decode`; the second is a receiver's verdict, in an
    `ack`, on a message that decoded (rules in docs/protocol.md, "Receiver rules")."""

    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    BAD_AFFINE = "bad_affine"
    FRAME_COUNT = "frame_count"
    FRAME_SIZE = "frame_size"
    BAD_PNG = "bad_png"

    CONFLICT = "conflict"
    TOO_LATE = "too_late"
    RUN_CLOSED = "run_closed"
    SEQ_REGRESSED = "seq_regressed"
    OUT_OF_ORDER = "out_of_order"
    UNKNOWN_SUBJECT = "unknown_subject"  # 1.1
    GEOMETRY_MISMATCH = "geometry_mismatch"  # 1.1
    BAD_DATA = "bad_data"  # 1.1
    LIMIT = "limit"  # 1.2: a bound on the receiver's state was hit


class ProtocolError(ValueError):
    """A message that breaks the protocol. `code` is a `Reason`; `seq` is the message's sequence
    number when its header was readable (so the receiver can say which message it refuses); `peer`
    is the sending socket's routing id when a ROUTER received it (set by the transport)."""

    def __init__(self, code: Reason, message: str, *, seq: int | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.seq = seq
        self.peer: bytes | None = None


@dataclass(frozen=True)
class Envelope:
    """Who sent a message and when: a random id per sender process start, that process's message
    counter (0, 1, 2, ... over all its messages), and its clock at send time (unix seconds)."""

    sender_id: str
    seq: int
    sent_unix_s: float


class Stamper:
    """Issues the envelopes of one sender process: its id is drawn once, its counter never goes back,
    so a receiver sees a restart as a new `sender_id` and a lost message as a gap in `seq`."""

    def __init__(self, sender_id: str | None = None):
        self.sender_id = sender_id or secrets.token_hex(8)
        self._next_seq = 0

    def envelope(self) -> Envelope:
        """The next envelope; call it right before sending, since it reads the clock."""
        envelope = Envelope(self.sender_id, self._next_seq, time.time())
        self._next_seq += 1
        return envelope


# ---- reading typed fields out of a JSON header ----------------------------------------------------

def _show(value: Any, width: int = 60) -> str:
    """repr of a received value, cut to `width` characters: error texts stay short enough for an ack."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _finite(value: int | float) -> float | None:
    """`value` as a float, or None when it is not finite; a JSON integer too large for a float is not."""
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Fields:
    """Typed access to one JSON object; every failure names the message type and the field's path."""

    def __init__(self, obj: dict, where: str, prefix: str = ""):
        self.obj, self.where, self.prefix = obj, where, prefix

    def _fail(self, code: Reason, name: str, text: str) -> ProtocolError:
        return ProtocolError(code, f"{self.where}: field '{self.prefix}{name}' {text}")

    def raw(self, name: str) -> Any:
        if name not in self.obj:
            raise self._fail(Reason.MISSING_FIELD, name, "is missing")
        return self.obj[name]

    def expect(self, name: str, value: Any, ok: bool, expected: str) -> Any:
        """`value` (found at `name`) if `ok`, else a wrong_type error naming what was expected."""
        if not ok:
            raise self._fail(Reason.WRONG_TYPE, name, f"must be {expected}, got {type(value).__name__} {_show(value)}")
        return value

    def integer(self, name: str, minimum: int = 0, maximum: int = _INT64_MAX, optional: bool = False) -> int | None:
        value = self.raw(name)
        if value is None and optional:
            return None
        expected = "an integer" + (" or null" if optional else "")
        self.expect(name, value, isinstance(value, int) and not isinstance(value, bool), expected)
        if not minimum <= value <= maximum:
            bound = "(and fit in 64 bits)" if maximum == _INT64_MAX else f"and <= {maximum}"
            raise self._fail(Reason.BAD_VALUE, name, f"must be >= {minimum} {bound}, got {_show(value, 30)}")
        return value

    def number(self, name: str, minimum: float | None = None, maximum: float | None = None, above: bool = False,
               optional: bool = False) -> float | None:
        """A finite number in [minimum, maximum] (minimum excluded if `above`); JSON integers are accepted."""
        value = self.raw(name)
        if value is None and optional:
            return None
        expected = "a number" + (" or null" if optional else "")
        self.expect(name, value, _is_number(value), expected)
        number = _finite(value)
        if number is None:
            raise self._fail(Reason.BAD_VALUE, name, f"must be finite, got {_show(value, 30)}")
        too_low = minimum is not None and (number < minimum or (above and number == minimum))
        if too_low or (maximum is not None and number > maximum):
            bounds = [f"{'>' if above else '>='} {minimum}"] if minimum is not None else []
            bounds += [f"<= {maximum}"] if maximum is not None else []
            raise self._fail(Reason.BAD_VALUE, name, f"must be {' and '.join(bounds)}, got {number}")
        return number

    def text(self, name: str) -> str:
        value = self.raw(name)
        return self.bounded_text(name, self.expect(name, value, isinstance(value, str), "a string"))

    def optional_text(self, name: str) -> str | None:
        value = self.raw(name)
        self.expect(name, value, value is None or isinstance(value, str), "a string or null")
        return value if value is None else self.bounded_text(name, value)

    def bounded_text(self, name: str, value: str) -> str:
        if len(value) > MAX_TEXT:
            raise self._fail(Reason.BAD_VALUE, name, f"must be at most {MAX_TEXT} characters, got {len(value)}")
        return value

    def identifier(self, name: str) -> str:
        value = self.text(name)
        if not _IDENTIFIER.fullmatch(value):
            raise self._fail(Reason.BAD_VALUE, name, f"must match {_IDENTIFIER.pattern} (a safe file name), "
                                                     f"got {value!r:.80}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        return self.expect(name, value, isinstance(value, bool), "true or false")

    def array(self, name: str) -> list:
        value = self.raw(name)
        return self.expect(name, value, isinstance(value, list), "a list")

    def objects(self, name: str, maximum: int | None = None, what: str = "entries") -> list[_Fields]:
        """A list of at most `maximum` JSON objects, each readable with its index in the path (e.g.
        `events[3].onset_s`)."""
        entries = self.array(name)
        if maximum is not None and len(entries) > maximum:
            raise self._fail(Reason.BAD_VALUE, name, f"lists {len(entries)} {what}, the limit is {maximum}")
        for i, entry in enumerate(entries):
            self.expect(f"{name}[{i}]", entry, isinstance(entry, dict), "an object")
        return [_Fields(entry, self.where, f"{self.prefix}{name}[{i}].") for i, entry in enumerate(entries)]

    def dtype(self) -> str:
        value = self.raw("dtype")
        if value not in DTYPES:
            raise self._fail(Reason.BAD_DTYPE, "dtype", f"must be one of {', '.join(DTYPES)}, got {value!r:.40}")
        return value

    def shape(self) -> tuple[int, int, int]:
        value = self.raw("shape")
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_DIMENSION for n in value)):
            raise self._fail(Reason.BAD_SHAPE, "shape", f"must be 3 positive integers [X, Y, Z], each <= "
                                                        f"{MAX_DIMENSION}, got {_show(value)}")
        if math.prod(value) > MAX_VOXELS:
            raise self._fail(Reason.BAD_SHAPE, "shape", f"has {math.prod(value)} voxels, the limit is {MAX_VOXELS} "
                                                        f"voxels, got {value}")
        return tuple(value)

    def affine(self) -> tuple[tuple[float, ...], ...]:
        """4x4 finite voxel-to-world matrix, rows first, last row exactly [0, 0, 0, 1]; that last check
        catches a transposed matrix from a column-major client."""
        value = self.raw("affine")
        if not (isinstance(value, list) and len(value) == 4 and all(
                isinstance(row, list) and len(row) == 4
                and all(_is_number(v) and _finite(v) is not None for v in row) for row in value)):
            raise self._fail(Reason.BAD_AFFINE, "affine", f"must be a 4x4 list of finite numbers (rows), "
                                                          f"got {_show(value, 80)}")
        if value[3] != [0, 0, 0, 1]:
            raise self._fail(Reason.BAD_AFFINE, "affine", f"last row must be [0, 0, 0, 1] (rows first, not "
                                                          f"columns), got {value[3]}")
        if any(abs(v) > MAX_ABS_MM for row in value for v in row):
            raise self._fail(Reason.BAD_AFFINE, "affine", f"entries must be at most {MAX_ABS_MM} mm in magnitude, "
                                                          f"got {_show(value, 80)}")
        return tuple(tuple(float(v) for v in row) for row in value)

    # the fields several messages share, with their limits
    def run(self) -> int:
        return self.integer("run", 1, MAX_RUN)

    def tr(self) -> float:
        return self.number("tr_s", MIN_TR_S, MAX_TR_S)

    def trial(self, name: str = "trial") -> int:
        return self.integer(name, 0, MAX_TRIALS - 1)

    def volume_index(self, name: str) -> int:
        return self.integer(name, 0, MAX_RUN_VOLUMES - 1)

    def image_id(self, optional: bool = False) -> int | None:
        return self.integer("image_id", 0, MAX_IMAGE_ID, optional=optional)

    def seconds(self, name: str) -> float:
        return self.number(name, 0.0, MAX_TIME_S)


def _geometry_header(shape: Sequence[int], dtype: str, affine: Any) -> dict:
    return {"dtype": dtype, "shape": list(shape), "affine": np.asarray(affine).tolist()}


# ---- messages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Motion:
    """1.3: the head's position when a volume was acquired, as the scanner side estimated it: the 6 rigid
    parameters of mindeye.motion (`MOTION_PARAMS`, relative to the session's reference volume) and the
    framewise displacement from the run's previous volume (Power 2012; 0 for the first)."""

    params_6: tuple[float, float, float, float, float, float]
    fd_mm: float

    def _header(self) -> dict:
        return {**dict(zip(MOTION_PARAMS, self.params_6)), "fd_mm": self.fd_mm}

    @classmethod
    def _read(cls, f: _Fields) -> Motion:
        params = tuple(f.number(name, -MAX_MOTION_MM, MAX_MOTION_MM) if name.endswith("_mm")
                       else f.number(name, -math.pi, math.pi) for name in MOTION_PARAMS)
        return cls(params, f.number("fd_mm", 0.0, MAX_FD_MM))


@dataclass(frozen=True)
class BridgeTimes:
    """1.3: when the scanner side handled a volume, on its clock (unix seconds): its file seen, read, and
    registered (motion-corrected and resampled). When it was sent is the envelope's `sent_unix_s`."""

    seen_unix_s: float
    read_unix_s: float
    registered_unix_s: float

    def _header(self) -> dict:
        return {"seen": self.seen_unix_s, "read": self.read_unix_s, "registered": self.registered_unix_s}

    @classmethod
    def _read(cls, f: _Fields) -> BridgeTimes:
        times = [f.number(stage, -MAX_ABS_UNIX_S, MAX_ABS_UNIX_S) for stage in BRIDGE_STAGES]
        if any(later < earlier for earlier, later in zip(times, times[1:])):
            raise ProtocolError(Reason.BAD_VALUE, f"{f.where}: field '{f.prefix.rstrip('.')}' must hold "
                                                  f"non-decreasing times {', '.join(BRIDGE_STAGES)}, got {times}")
        return cls(*times)


def _optional_object(f: _Fields, name: str, kind: type) -> Any:
    """`kind` read from the object at `name`, or None when the field is absent (an older sender) or null."""
    value = f.obj.get(name)
    if value is None:
        return None
    f.expect(name, value, isinstance(value, dict), "an object or null")
    return kind._read(_Fields(value, f.where, f"{f.prefix}{name}."))


@dataclass(frozen=True)
class Volume:
    """One preprocessed fMRI volume of a run; `data` holds X*Y*Z samples, C order, little-endian."""

    TYPE: ClassVar[str] = "volume"
    session: str
    subject: str
    run: int  # as numbered by the scanner console (NSD: 1..12)
    index: int  # 0-based within the run
    acq_time_s: float  # acquisition time since the run's first volume
    tr_s: float
    dtype: str
    shape: tuple[int, int, int]  # X, Y, Z
    affine: tuple[tuple[float, ...], ...]  # 4x4 voxel -> world (mm), rows first
    data: Buffer
    envelope: Envelope
    motion: Motion | None = None  # 1.3: optional, from a scanner side that corrects motion
    bridge: BridgeTimes | None = None  # 1.3: optional, from a scanner side that reads the scanner's files

    @classmethod
    def from_array(cls, volume_xyz: np.ndarray, *, session: str, subject: str, run: int, index: int,
                   acq_time_s: float, tr_s: float, affine: Any, envelope: Envelope, motion: Motion | None = None,
                   bridge: BridgeTimes | None = None) -> Volume:
        """A message holding a little-endian C-order copy of `volume_xyz` (X, Y, Z), so later
        changes to the array cannot alter what is sent."""
        if volume_xyz.ndim != 3:
            raise ProtocolError(Reason.BAD_SHAPE, f"volume: array must be 3-D (X, Y, Z), got shape {volume_xyz.shape}")
        if volume_xyz.dtype.name not in DTYPES:
            raise ProtocolError(Reason.BAD_DTYPE, f"volume: dtype must be one of {', '.join(DTYPES)}, "
                                                  f"got {volume_xyz.dtype.name}")
        data = np.ascontiguousarray(volume_xyz, dtype=volume_xyz.dtype.newbyteorder("<")).tobytes()
        return cls(session, subject, run, index, float(acq_time_s), float(tr_s), volume_xyz.dtype.name,
                   tuple(volume_xyz.shape), tuple(tuple(float(v) for v in row) for row in np.asarray(affine)),
                   data, envelope, motion, bridge)

    def array(self) -> np.ndarray:
        """The samples as a read-only (X, Y, Z) array viewing `data` (no copy)."""
        view_xyz = np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)
        view_xyz.flags.writeable = False
        return view_xyz

    def _header(self) -> tuple[dict, list[Buffer]]:
        optional = {name: part._header() for name, part in (("motion", self.motion), ("bridge", self.bridge))
                    if part is not None}  # absent, not null: a 1.2 header stays byte for byte what it was
        return {"session": self.session, "subject": self.subject, "run": self.run, "index": self.index,
                "acq_time_s": self.acq_time_s, "tr_s": self.tr_s,
                **_geometry_header(self.shape, self.dtype, self.affine), **optional}, [self.data]

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> Volume:
        message_fields = (f.identifier("session"), f.identifier("subject"), f.run(), f.volume_index("index"),
                          f.seconds("acq_time_s"), f.tr())
        dtype, shape, affine = f.dtype(), f.shape(), f.affine()
        motion, bridge = _optional_object(f, "motion", Motion), _optional_object(f, "bridge", BridgeTimes)
        _frame_count(cls.TYPE, payload, 1)
        expected_bytes = math.prod(shape) * np.dtype(dtype).itemsize
        if payload[0].nbytes != expected_bytes:
            kind = "truncated" if payload[0].nbytes < expected_bytes else "oversized"
            raise ProtocolError(Reason.FRAME_SIZE, f"volume: frame 1 is {kind}: {payload[0].nbytes} bytes, expected "
                                                   f"{expected_bytes} ({'x'.join(map(str, shape))} {dtype})")
        return cls(*message_fields, dtype, shape, affine, payload[0], envelope, motion, bridge)


@dataclass(frozen=True)
class RunStart:
    """A run begins: its timing and the geometry every volume of it will have."""

    TYPE: ClassVar[str] = "run_start"
    session: str
    subject: str
    run: int
    tr_s: float
    n_volumes: int | None  # expected volumes, None when unknown
    dtype: str
    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    envelope: Envelope

    def _header(self) -> tuple[dict, list[Buffer]]:
        return {"session": self.session, "subject": self.subject, "run": self.run, "tr_s": self.tr_s,
                "n_volumes": self.n_volumes, **_geometry_header(self.shape, self.dtype, self.affine)}, []

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> RunStart:
        message = cls(f.identifier("session"), f.identifier("subject"), f.run(), f.tr(),
                      f.integer("n_volumes", 1, MAX_RUN_VOLUMES, optional=True), f.dtype(), f.shape(), f.affine(),
                      envelope)
        _frame_count(cls.TYPE, payload, 0)
        return message


@dataclass(frozen=True)
class RunEnd:
    """A run is over: the sender sent `n_volumes` volumes (indices 0 .. n_volumes - 1)."""

    TYPE: ClassVar[str] = "run_end"
    session: str
    run: int
    n_volumes: int
    envelope: Envelope

    def _header(self) -> tuple[dict, list[Buffer]]:
        return {"session": self.session, "run": self.run, "n_volumes": self.n_volumes}, []

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> RunEnd:
        message = cls(f.identifier("session"), f.run(), f.integer("n_volumes", 0, MAX_RUN_VOLUMES), envelope)
        _frame_count(cls.TYPE, payload, 0)
        return message


@dataclass(frozen=True)
class Event:
    """One trial of a run's schedule; `image_id` is the stimulus id (NSD: 0-based 73k id) or None."""

    trial: int  # 0-based within the run
    onset_s: float  # since the run's first volume
    duration_s: float
    image_id: int | None
    label: str


@dataclass(frozen=True)
class Events:
    """Trials of a run's schedule; several messages may add to it, `complete` says none will follow."""

    TYPE: ClassVar[str] = "events"
    session: str
    run: int
    events: tuple[Event, ...]
    complete: bool
    envelope: Envelope

    def _header(self) -> tuple[dict, list[Buffer]]:
        events = [{"trial": e.trial, "onset_s": e.onset_s, "duration_s": e.duration_s, "image_id": e.image_id,
                   "label": e.label} for e in self.events]
        return {"session": self.session, "run": self.run, "events": events, "complete": self.complete}, []

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> Events:
        events = tuple(Event(e.trial(), e.seconds("onset_s"), e.number("duration_s", 0.0, MAX_DURATION_S),
                             e.image_id(optional=True), e.text("label"))
                       for e in f.objects("events", MAX_TRIALS, "trials"))
        repeated = sorted(trial for trial, n in Counter(e.trial for e in events).items() if n > 1)
        if repeated:
            raise ProtocolError(Reason.BAD_VALUE, f"events: field 'events' lists trials {_show(repeated)} more than "
                                                  f"once")
        message = cls(f.identifier("session"), f.run(), events, f.boolean("complete"), envelope)
        _frame_count(cls.TYPE, payload, 0)
        return message


@dataclass(frozen=True)
class Retrieval:
    """One entry of a top-k retrieval list: a candidate image and its similarity to the prediction."""

    image_id: int
    score: float


@dataclass(frozen=True)
class Result:
    """What the service decoded for one trial. Timings are per stage in ms (`TIMING_STAGES` names the
    known ones); `flags` holds values such as those in `RESULT_FLAGS`; images are PNG bytes."""

    TYPE: ClassVar[str] = "result"
    session: str
    run: int
    trial: int
    image_id: int | None  # the image shown, when the service knows it
    volume_index: int  # the volume whose arrival completed the trial's response window
    embedding_norm: float | None  # L2 norm of the predicted embedding; None when not decoded
    top_k: tuple[Retrieval, ...]  # best first
    timings_ms: dict[str, float]
    flags: tuple[str, ...]
    envelope: Envelope
    image_png: Buffer | None = None  # the reconstruction
    lowlevel_png: Buffer | None = None  # the low-level (blurry) image
    # 1.2: whether image_id was among the retrieval candidates (only the service knows its bank); None when
    # the image is unknown or the trial was not decoded. A result without the field reads as None.
    image_is_candidate: bool | None = None

    def _header(self) -> tuple[dict, list[Buffer]]:
        attached = [(name, png) for name, png in (("image_png", self.image_png), ("lowlevel_png", self.lowlevel_png))
                    if png is not None]
        return {"session": self.session, "run": self.run, "trial": self.trial, "image_id": self.image_id,
                "image_is_candidate": self.image_is_candidate, "volume_index": self.volume_index,
                "embedding_norm": self.embedding_norm,
                "top_k": [{"image_id": r.image_id, "score": r.score} for r in self.top_k],
                "timings_ms": self.timings_ms, "flags": list(self.flags),
                "frames": [name for name, _ in attached]}, [png for _, png in attached]

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> Result:
        top_k = tuple(Retrieval(r.image_id(), r.number("score")) for r in f.objects("top_k"))
        if any(a.score < b.score for a, b in zip(top_k, top_k[1:])):
            raise ProtocolError(Reason.BAD_VALUE, "result: field 'top_k' must be sorted by score, best first")
        timings = f.raw("timings_ms")
        f.expect("timings_ms", timings, isinstance(timings, dict), "an object of stage -> milliseconds")
        timing_fields = _Fields(timings, cls.TYPE, "timings_ms.")
        timings_ms = {stage: timing_fields.number(stage, 0.0) for stage in timings}
        flags = f.array("flags")
        for i, flag in enumerate(flags):
            f.bounded_text(f"flags[{i}]", f.expect(f"flags[{i}]", flag, isinstance(flag, str), "a string"))
        frames = f.array("frames")
        if frames not in ([], ["image_png"], ["lowlevel_png"], ["image_png", "lowlevel_png"]):
            raise ProtocolError(Reason.BAD_VALUE, f"result: field 'frames' must list 'image_png' and/or "
                                                  f"'lowlevel_png' in that order, got {frames!r:.80}")
        _frame_count(cls.TYPE, payload, len(frames))
        pngs = dict(zip(frames, payload))
        is_candidate = f.obj.get("image_is_candidate")  # optional (1.2): older senders leave it out
        f.expect("image_is_candidate", is_candidate, is_candidate is None or isinstance(is_candidate, bool),
                 "true, false or null")
        for i, (name, png) in enumerate(pngs.items(), start=1):
            if bytes(png[:8]) != PNG_SIGNATURE:
                raise ProtocolError(Reason.BAD_PNG, f"result: frame {i} ('{name}') does not start with the PNG "
                                                    f"signature")
        return cls(f.identifier("session"), f.run(), f.trial(), f.image_id(optional=True),
                   f.volume_index("volume_index"),
                   f.number("embedding_norm", 0.0, optional=True), top_k, timings_ms, tuple(flags), envelope, **pngs,
                   image_is_candidate=is_candidate)


class Verdict(StrEnum):
    """What a receiver did with a message (see docs/protocol.md, "Receiver rules")."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Ack:
    """The receiver's verdict on one message it got: `acked_seq` is that message's `seq` (None when its
    header was unreadable); `reason` (a `Reason`) is required when rejected, optional otherwise."""

    TYPE: ClassVar[str] = "ack"
    acked_seq: int | None
    verdict: Verdict
    reason: str | None
    detail: str
    envelope: Envelope

    @classmethod
    def rejecting(cls, error: ProtocolError, envelope: Envelope) -> Ack:
        return cls(error.seq, Verdict.REJECTED, error.code, str(error)[:MAX_TEXT], envelope)

    def _header(self) -> tuple[dict, list[Buffer]]:
        return {"acked_seq": self.acked_seq, "verdict": str(self.verdict), "reason": self.reason,
                "detail": self.detail}, []

    @classmethod
    def _read(cls, f: _Fields, payload: list[memoryview], envelope: Envelope) -> Ack:
        verdict = f.text("verdict")
        if verdict not in set(Verdict):
            raise ProtocolError(Reason.BAD_VALUE, f"ack: field 'verdict' must be one of "
                                                  f"{', '.join(Verdict)}, got {verdict!r:.40}")
        reason = f.optional_text("reason")
        if verdict == Verdict.REJECTED and reason is None:
            raise ProtocolError(Reason.BAD_VALUE, "ack: field 'reason' must be a reason code, not null, when the "
                                                  "verdict is rejected")
        message = cls(f.integer("acked_seq", optional=True), Verdict(verdict), reason, f.text("detail"), envelope)
        _frame_count(cls.TYPE, payload, 0)
        return message


Message: TypeAlias = Volume | RunStart | RunEnd | Events | Result | Ack
MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (Volume, RunStart, RunEnd, Events, Result, Ack)}


def _frame_count(type_name: str, payload: list[memoryview], expected: int) -> None:
    if len(payload) != expected:
        raise ProtocolError(Reason.FRAME_COUNT, f"{type_name}: expected 1 header frame + {expected} payload "
                                                f"frame(s), got 1 + {len(payload)}")


def _json_value(value: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise ProtocolError(Reason.WRONG_TYPE, f"cannot write a {type(value).__name__} as JSON")


# ---- encode / decode --------------------------------------------------------------------------------

def header_of(message: Message) -> dict:
    """The JSON object frame 0 of `message` holds: the envelope, then the message's own fields."""
    fields, _ = message._header()
    envelope = message.envelope
    return {"protocol_version": PROTOCOL_VERSION, "type": message.TYPE, "sender_id": envelope.sender_id,
            "seq": envelope.seq, "sent_unix_s": envelope.sent_unix_s, **fields}


def encode(message: Message) -> list[Buffer]:
    """Frames of `message`: its JSON header, then its payload buffers (not copied). Raises
    ProtocolError for anything `decode` would refuse."""
    header, payload = header_of(message), message._header()[1]
    try:
        text = json.dumps(header, separators=(",", ":"), default=_json_value)
    except ProtocolError:
        raise
    except ValueError as error:  # an integer past Python's int-to-text digit limit
        raise ProtocolError(Reason.BAD_VALUE, f"{message.TYPE}: cannot be written as JSON: {error}") from None
    frames = [text.encode(), *payload]
    decode(frames)  # the one set of checks, on the exact bytes that will travel
    return frames


def decode(frames: Sequence[Buffer]) -> Message:
    """The message in `frames` (header frame first). Payload frames are viewed, not copied: keep them
    alive and unchanged while the message is in use."""
    if len(frames) == 0:
        raise ProtocolError(Reason.FRAME_COUNT, "message has no frames; frame 0 must be the JSON header")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(Reason.FRAME_COUNT, f"message has {len(frames)} frames, the limit is {MAX_FRAMES} (a "
                                                f"header and at most {MAX_FRAMES - 1} payload frames)")
    views = [_bytes_view(frame) for frame in frames]
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(Reason.FRAME_SIZE, f"header frame of {views[0].nbytes} bytes, the limit is "
                                               f"{MAX_HEADER_BYTES}")
    for i, view in enumerate(views[1:], start=1):
        if view.nbytes > MAX_FRAME_BYTES:
            raise ProtocolError(Reason.FRAME_SIZE, f"frame {i} of {view.nbytes} bytes, the limit is {MAX_FRAME_BYTES}")
    try:
        header = json.loads(bytes(views[0]).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors,
        # and so is an integer of more digits than Python converts (4300)
        raise ProtocolError(Reason.NOT_JSON, f"frame 0 is not UTF-8 JSON: {_show(str(error), 300)}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Reason.NOT_OBJECT, f"frame 0 must be a JSON object, got {type(header).__name__}")
    seq = header.get("seq")
    valid_seq = isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= _INT64_MAX
    try:
        return _decode_header(header, views[1:])
    except ProtocolError as error:
        error.seq = seq if valid_seq else None  # an ack can only name a seq that is one
        raise


def _bytes_view(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _decode_header(header: dict, payload: list[memoryview]) -> Message:
    fields = _Fields(header, "header")
    version = fields.text("protocol_version")
    match = _VERSION.fullmatch(version)
    if match is None or int(match[1]) != PROTOCOL_MAJOR:
        raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"protocol_version {version!r:.20} is not supported: "
                                                        f"this side speaks {PROTOCOL_MAJOR}.x (now {PROTOCOL_VERSION})")
    type_name = fields.text("type")
    if type_name not in MESSAGE_TYPES:
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"unknown message type {type_name!r:.40}; known: "
                                                 f"{', '.join(MESSAGE_TYPES)}")
    fields = _Fields(header, type_name)
    envelope = Envelope(fields.identifier("sender_id"), fields.integer("seq"),
                        fields.number("sent_unix_s", -MAX_ABS_UNIX_S, MAX_ABS_UNIX_S))
    return MESSAGE_TYPES[type_name]._read(fields, payload, envelope)
