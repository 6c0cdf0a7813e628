"""Hostile input for the realtime service's volume socket (docs/protocol.md), and a harness that
streams it at a live service (issue 9).

A message is a list of frames (bytes), as a DEALER sends it. Three kinds of hostility, drawn either
by hypothesis (`headers()`, `frames()`: for properties of `decode`, with shrinking) or by the seeded
`Mutator` (`random_messages(seed, n)`: the million-message run, where hypothesis is far too slow):

- fields: a well-formed message of any type (run_start, events, volume - half of them with 1.3's motion
  and bridge times -, run_end, and result and ack, which the service must refuse on this socket) with
  fields anywhere in the header replaced by hostile values (huge, negative, float, bool, NaN, string,
  null, nested, long, unicode), deleted, or joined by extra fields; raw JSON no encoder writes
  (5000-digit numbers, 1e999, deep nesting);
- frames: frames dropped or added (up to 70), payloads truncated, extended or of the wrong size;
- bytes: bit flips, insertions, deletions and splices of encoded frames.

Given the service's `World` (its subject and ROI geometry), the mutator also plays runs that the
service accepts - started, volumes in and out of order, indices far ahead, extreme TRs, onsets and
sample values, run_end of 10**18 volumes, resends after the run closed - so hostile values reach
admission, the GLM and the decoder, not only the parser. A few huge messages (2-16 MB frames, 10**4
trials, an NSD-size volume) come every `huge_every` messages.

`fuzz_service` runs the service as tests/test_realtime_service.py does (a thread, the tiny world, an
untrained tiny model, journal fsync "never") but in a child process: a hang there is killed and a
memory blow-up stopped, where a hung thread of the caller could be neither. One DEALER streams fuzz,
another a clean run (then resends it after it closed); `FuzzReport` says what came back.
"""
from __future__ import annotations

import copy
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

from mindeye.protocol import Ack, Message, ProtocolError, Stamper, decode, encode

TYPES = ("run_start", "events", "volume", "run_end", "result", "ack")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(8)  # the signature is all decode looks at
SMALL_AFFINE = ((2.0, 0.0, 0.0, -1.0), (0.0, 2.0, 0.0, -1.0), (0.0, 0.0, 2.0, -1.0), (0.0, 0.0, 0.0, 1.0))
SMALL = ("subj01", (2, 2, 2), SMALL_AFFINE, "int16")  # (subject, shape, affine, dtype): never any ROI's geometry
SUBJECTS = ("subj01", "subj02", "nobody")
FUZZ_SESSIONS = ("fz-a", "fz-b", "fz.c_1")  # fuzz never uses the clean run's session, so it cannot touch it

HUGE = 10**400  # hundreds of digits: float() of it overflows
HOSTILE_INTS = (-1, -(2**63), -(2**63) - 1, 2**63 - 1, 2**63, 2**64, 10**6, 10**9, 10**18, HUGE, -HUGE, 10**4000)
HOSTILE = HOSTILE_INTS + (
    0, True, False, None, 0.5, 3.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf,
    "", "1", "1.1", "NaN", "x" * 10_000, "é", "\u202e", "\ud800", "\x00", "../x", "a" * 65,
    [], [1, 2, 3], [[0, 0, 0, 1]] * 4, [[1e308] * 4] * 3 + [[0, 0, 0, 1]], {}, {"a": {"b": [None, 1.5]}}, [None])
# JSON text that json.dumps never writes: numbers past Python's 4300-digit limit, overflowing
# exponents, nesting past the recursion limit, escapes, and tokens that are not JSON at all
RAW = ("1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "1E-400", "NaN", "Infinity", "-Infinity",
       "[" * 3000 + "]" * 3000, '{"a":' * 3000 + "0" + "}" * 3000, '"\\ud800"', '"\\u0000"', "-0", "0.0e0",
       "01", "1.", ".5", "+1", "0x1f", "\u0661", "1_000")
VERSIONS = ("1.1", "1.0", "1.2", "1.99", "1.1.0", "1", "2.0", "0.9", "", " 1.1", "1.1\n", "\uff11.1",
            "\u0661.\u0661", "1.\u0663", "\U0001d7cf.1", "01.1", "+1.1", "1.-1", "0" * 5000 + "1.1",
            "1" * 5000 + ".1", "1." + "1" * 5000, "NaN")
FRAME0 = (b"", b" ", b"\xff\xfe", b"\xc0\x80", b"[]", b"null", b'"x"', b"1e999", b"{", b"}", b'{"a":1}',
          "\ufeff{}".encode(), '{"type":"volume"}'.encode("utf-16"))
FAR_INDICES = (9_999, 10_000, 10**6, 10**9, 10**18, 2**63 - 1)
HOSTILE_TR_S = (5e-324, 1e-300, 1e-3, 0.01, 59.99, 1e300)
DTYPES = ("int16", "uint16", "float32", "float64")
HOSTILE_TIMES = (0.0, 5e-324, 1e9, 86_400.0, 1e300)
_RAW_MARK = "\x01raw\x01"  # a value replaced by raw JSON text after dumping
_INTERESTING = b'"{}[],:\\-.019eE \x00\x7f\x80\xc3\xff'


# ---- well-formed messages ----------------------------------------------------------------------------

@lru_cache(maxsize=128)
def volume_bytes(shape: tuple[int, int, int], dtype: str, kind: str = "plain") -> bytes:
    """Samples of one volume, cached (the mutator reuses them): "plain" ~1000 +- noise as a scanner
    gives, "extreme" the dtype's largest magnitudes, "nan" NaN (floats; zeros otherwise)."""
    rng = np.random.default_rng(0)
    n = math.prod(shape)
    if kind == "extreme":
        info = np.finfo(dtype) if dtype.startswith("float") else np.iinfo(dtype)
        values = np.where(rng.random(n) < 0.5, info.max, info.min)
    elif kind == "nan":
        values = np.full(n, np.nan) if dtype.startswith("float") else np.zeros(n)
    else:
        values = 1000 + 20 * rng.standard_normal(n)
    return values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def events(rng: random.Random, first: int, n: int) -> list[dict]:
    return [{"trial": first + k, "onset_s": 12.0 + 4.0 * (first + k), "duration_s": 3.0,
             "image_id": rng.choice((None, rng.randrange(73_000))), "label": rng.choice(("image", "blank", "x"))}
            for k in range(n)]


def template(type_: str, rng: random.Random, *, sender: str = "fz0", seq: int = 0, session: str = "fz-a",
             run: int = 1, geometry: tuple = SMALL, index: int = 0, tr_s: float = 1.5) -> tuple[dict, list[bytes]]:
    """A header that decodes as `type_`, and its payload frames."""
    subject, shape, affine, dtype = geometry
    header = {"protocol_version": "1.1", "type": type_, "sender_id": sender, "seq": seq,
              "sent_unix_s": 1.7e9 + rng.random()}
    where = {"session": session, "run": run}
    grid = {"dtype": dtype, "shape": list(shape), "affine": [list(row) for row in affine]}
    if type_ == "volume":
        header.update(where, subject=subject, index=index, acq_time_s=index * tr_s, tr_s=tr_s, **grid)
        if rng.random() < 0.5:  # a bridge's volume (1.3): its motion and scanner-side times, fuzzed like the rest
            seen = header["sent_unix_s"] - 0.2
            header.update(motion={"trans_x_mm": 0.4, "trans_y_mm": -0.1, "trans_z_mm": 0.9, "rot_x_rad": 0.003,
                                  "rot_y_rad": -0.0007, "rot_z_rad": 0.0012, "fd_mm": 0.23},
                          bridge={"seen": seen, "read": seen + 0.04, "registered": seen + 0.14})
        return header, [volume_bytes(tuple(shape), dtype)]
    if type_ == "run_start":
        header.update(where, subject=subject, tr_s=tr_s, n_volumes=rng.choice((None, 1, 73, 226)), **grid)
    elif type_ == "events":
        header.update(where, events=events(rng, rng.randrange(60), rng.choice((1, 1, 2, 5))),
                      complete=rng.random() < 0.5)
    elif type_ == "run_end":
        header.update(where, n_volumes=rng.choice((0, 1, 73)))
    elif type_ == "result":
        frames = rng.choice(([], ["image_png"], ["lowlevel_png"], ["image_png", "lowlevel_png"]))
        header.update(where, trial=rng.randrange(63), image_id=rng.choice((None, 46002)), volume_index=40,
                      embedding_norm=rng.choice((None, 31.4)),
                      top_k=[{"image_id": 46002, "score": 0.41}, {"image_id": 5210, "score": 0.39}],
                      timings_ms={"receive": 0.04, "decode": 3.7}, flags=["late"], frames=frames)
        return header, [PNG] * len(frames)
    elif type_ == "ack":
        verdict, reason = rng.choice((("accepted", None), ("duplicate", None), ("rejected", "conflict")))
        header.update(acked_seq=rng.choice((None, 12)), verdict=verdict, reason=reason, detail="")
    return header, []


def dump(header: dict, raw: str | None = None, ensure_ascii: bool = True) -> bytes:
    """Frame 0 for `header`; `raw` replaces the value `_RAW_MARK`. Lone surrogates go out as the
    invalid UTF-8 they are when not escaped."""
    text = json.dumps(header, separators=(",", ":"), allow_nan=True, ensure_ascii=ensure_ascii)
    if raw is not None:
        text = text.replace(json.dumps(_RAW_MARK), raw, 1)
    return text.encode("utf-8", "surrogatepass")


# ---- where a header can be hit -----------------------------------------------------------------------

def field_paths(header: dict, depth: int = 3) -> list[tuple]:
    """Every key and list index down to `depth`: ("seq",), ("affine", 3, 2), ("events", 0, "onset_s")."""
    paths: list[tuple] = []

    def walk(value, path):
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            paths.append((*path, key))
            if len(path) + 1 < depth:
                walk(item, (*path, key))

    walk(header, ())
    return paths


def set_path(header: dict, path: tuple, value) -> None:
    """Put `value` at `path`; a list or dict as a copy, since a later hit inside it must not change
    the pool it came from (nor make it contain itself)."""
    value = copy.deepcopy(value) if isinstance(value, list | dict) else value
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value


def delete_path(header: dict, path: tuple) -> None:
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


# ---- frame and byte mutations (shared: `random.Random` from the mutator or from hypothesis) ----------

def mutate_frames(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """One frame-level fault: a frame dropped, frames added (up to 70 in all), one truncated or
    extended, the payload of a wrong size, or nothing but empty frames."""
    frames = list(frames)
    op = rng.randrange(6)
    if op == 0 and len(frames) > 1:
        del frames[rng.randrange(len(frames))]  # the header too: then a payload is read as the header
    elif op == 1:
        extra = min(70 - len(frames), rng.choice((1, 2, 3, 61, 62, 63, 64, 65, 66, 67, 68, 69)))
        frames += [rng.choice((b"", PNG, bytes(16), frames[-1], frames[0])) for _ in range(extra)]
    elif op == 2:
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif op == 3:
        i = rng.randrange(len(frames))
        frames[i] += bytes(rng.choice((1, 2, 7, 64)))
    elif op == 4:
        size = rng.choice((0, 1, 15, 17, 4096, 5408, 65536))
        frames[-1 if len(frames) > 1 else len(frames):] = [bytes(size)]
    else:
        frames = [b""] * rng.choice((1, 2, 4))
    return frames or [b""]  # ZeroMQ sends no message of zero frames


def mutate_bytes(frames: list[bytes], rng: random.Random, donor: bytes = b"") -> list[bytes]:
    """Raw damage to one frame (the header 4 times in 5): bit flips, bytes overwritten, inserted,
    deleted or repeated, or its tail spliced from `donor` (another message's header)."""
    frames = list(frames)
    i = 0 if len(frames) == 1 or rng.random() < 0.8 else rng.randrange(1, len(frames))
    data = bytearray(frames[i])
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        pos = rng.randrange(len(data) + 1)
        op = rng.randrange(6)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rng.choice(_INTERESTING)
        elif op == 2:
            data[pos:pos] = bytes(rng.choice(_INTERESTING) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and data:
            del data[pos:pos + rng.randrange(1, 17)]
        elif op == 4 and data:
            data[pos:pos] = data[max(0, pos - 16):pos]
        else:
            data[pos:] = donor[rng.randrange(len(donor) + 1):]
    frames[i] = bytes(data)
    return frames


# ---- hypothesis strategies ---------------------------------------------------------------------------

def hostile_values() -> st.SearchStrategy:
    """Any JSON value, biased to the ones that broke receivers: see HOSTILE."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    return st.one_of(
        st.sampled_from(HOSTILE), st.integers(), st.floats(), st.text(max_size=40),
        st.builds(lambda digits, sign: sign * (10**digits + 7), st.integers(17, 450), st.sampled_from((1, -1))),
        st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3), max_leaves=8))


HOSTILE_VALUES = hostile_values()


@st.composite
def headers(draw, types: tuple[str, ...] = TYPES) -> tuple[dict, list[bytes]]:
    """A header of one of `types` with 0-3 fields anywhere in it replaced, deleted or added, and the
    payload its unmutated version would carry."""
    rng = draw(st.randoms(use_true_random=False))
    type_ = draw(st.sampled_from(types))
    geometry = (draw(st.sampled_from(SUBJECTS)), *SMALL[1:3], draw(st.sampled_from(("int16", "uint16", "float32",
                                                                                     "float64"))))
    header, payload = template(type_, rng, sender=draw(st.sampled_from(("fz0", "3f9c2a71d04be518", "a" * 64))),
                               seq=draw(st.integers(0, 2**63 - 1)), geometry=geometry,
                               index=draw(st.integers(0, 300)), tr_s=draw(st.floats(1e-3, 1e3)))
    for _ in range(draw(st.integers(0, 3))):
        paths = field_paths(header)
        action = draw(st.sampled_from(("replace", "replace", "replace", "delete", "extra")))
        if action == "extra" or not paths:
            set_path(header, (draw(st.text(max_size=12)),), draw(HOSTILE_VALUES))
        elif action == "delete":
            delete_path(header, draw(st.sampled_from(paths)))
        else:
            set_path(header, draw(st.sampled_from(paths)), draw(HOSTILE_VALUES))
    return header, payload


@st.composite
def frames(draw) -> list[bytes]:
    """A message for the volume socket: hostile fields, raw JSON, a bad version, frame faults or
    byte damage, on any message type."""
    header, payload = draw(headers())
    kind = draw(st.sampled_from(("fields", "raw", "version", "frame0", "frames", "bytes")))
    rng = draw(st.randoms(use_true_random=False))
    raw = None
    if kind == "raw":
        paths = field_paths(header)
        set_path(header, draw(st.sampled_from(paths)), _RAW_MARK)
        raw = draw(st.sampled_from(RAW))
    elif kind == "version":
        header["protocol_version"] = draw(st.sampled_from(VERSIONS) | st.from_regex(r"\d{1,3}\.\d{1,3}", fullmatch=True)
                                          | st.text(max_size=6))
    out = [dump(header, raw, ensure_ascii=draw(st.booleans())), *payload]
    if kind == "frame0":
        out[0] = draw(st.sampled_from(FRAME0) | st.binary(max_size=64))
    elif kind == "frames":
        out = mutate_frames(out, rng)
    elif kind == "bytes":
        donor, _ = template(draw(st.sampled_from(TYPES)), rng)
        out = mutate_bytes(out, rng, dump(donor))
    return out


# ---- the seeded mutator --------------------------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """What the service accepts runs of: its subject and the ROI's grid (so fuzz runs get admitted)."""

    subject: str
    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    tr_s: float

    @classmethod
    def of(cls, root: Path, subject: int = 1) -> World:
        from mindeye.nsd import NSDLayout, read_roi, subject_name

        roi = read_roi(NSDLayout(Path(root)).roi(subject))
        return cls(subject_name(subject), tuple(roi.shape), tuple(map(tuple, roi.affine.tolist())), 4.0 / 3.0)


class Fuzz(NamedTuple):
    kind: str
    frames: list[bytes]
    decodable: bool | None = None  # known by construction; None: ask decode


@dataclass
class _Run:
    """A fuzz run the service may accept: what the mutator sent of it."""

    session: str
    run: int
    dtype: str
    tr_s: float
    hostile: bool  # extreme TR, onsets, samples and indices; else only the mild faults
    next_index: int = 0
    last_index: int = -1  # the highest index sent below 10**4 (what a final run_end counts)
    gap: int | None = None  # an index skipped, to send next
    next_trial: int = 0
    volumes: int = 0  # volumes to send before the final run_end
    first: bool = False  # one of the first runs, all hostile
    scheduled: bool = False  # an events message was sent
    ended: bool = False
    after_end: int = 0  # messages resent since


WEIGHTS = {"run": 30, "fields": 25, "raw": 8, "frames": 10, "bytes": 15, "flood": 7, "valid": 5}


class Mutator:
    """Fuzz messages from a seed, ~0.1 ms each: the hypothesis mix without hypothesis's overhead.
    `skip`: kinds (WEIGHTS, "huge") or hostile values of the accepted runs ("tr", "times", "samples",
    "far") left out, to see what else fails while one bug is open."""

    def __init__(self, seed: int = 0, world: World | None = None, *, huge_every: int = 1000, skip=()):
        self.rng = random.Random(seed)
        self.world, self.huge_every, self.skip = world, huge_every, frozenset(skip)
        kinds = [k for k in WEIGHTS if k not in self.skip and (k != "run" or world is not None)]
        self._kinds, self._weights = kinds, [WEIGHTS[k] for k in kinds]
        # senders that count up; a mutated seq (2**63 - 1, say) ends one, so runs have their own
        self._seqs = {f"fz{k:02d}": 0 for k in range(8)}
        self._run_seqs = {f"fzrun{k:02d}": 0 for k in range(4)}
        self._runs: list[_Run] = []
        self._n = self._run_counter = 0
        self._huge = 0

    def message(self) -> Fuzz:
        self._n += 1
        if "huge" not in self.skip and self._n % self.huge_every == 0:
            return self._huge_message()
        kind = self.rng.choices(self._kinds, self._weights)[0]
        return getattr(self, "_" + kind)()

    # -- senders ---------------------------------------------------------------------------------------

    def _envelope(self, senders: dict[str, int] | None = None) -> tuple[str, int]:
        """A fresh sender a quarter of the time (ids pile up at the receiver), else one of `senders`
        (default: those of the mutated kinds) counting up, now and then repeating a seq
        (seq_regressed) or skipping ahead (messages lost)."""
        rng = self.rng
        senders = self._seqs if senders is None else senders
        r = rng.random()
        if r < 0.25:
            return f"{rng.getrandbits(64):016x}", rng.randrange(3)
        sender = rng.choice(tuple(senders))
        seq = senders[sender] + (0 if r < 0.27 else rng.choice((2, 1000, 2**40)) if r < 0.29 else 1)
        senders[sender] = max(senders[sender], seq)
        return sender, seq

    def _small(self, type_: str | None = None) -> tuple[dict, list[bytes]]:
        """A well-formed message on a grid no ROI has: it can never start a run."""
        rng = self.rng
        sender, seq = self._envelope()
        geometry = (rng.choice(SUBJECTS), SMALL[1], SMALL[2], rng.choice(("int16", "int16", "float32", "float64")))
        return template(type_ or rng.choice(TYPES), rng, sender=sender, seq=seq, session=rng.choice(FUZZ_SESSIONS),
                        run=rng.randrange(1, 13), geometry=geometry, index=rng.randrange(100))

    # -- kinds -------------------------------------------------------------------------------------------

    def _fields(self) -> Fuzz:
        rng = self.rng
        header, payload = self._small()
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            paths = field_paths(header)
            r = rng.random()
            if r < 0.6:
                set_path(header, rng.choice(paths), rng.choice(HOSTILE))
            elif r < 0.85:
                delete_path(header, rng.choice(paths))
            else:
                set_path(header, (rng.choice(("extra", "", "seq ", "\u00e9", "x" * 300)),), rng.choice(HOSTILE))
        return Fuzz("fields", [dump(header, ensure_ascii=rng.random() < 0.7), *payload])

    def _raw(self) -> Fuzz:
        rng = self.rng
        header, payload = self._small()
        r = rng.random()
        if r < 0.15:
            return Fuzz("raw", [rng.choice(FRAME0), *payload])
        if r < 0.4:
            header["protocol_version"] = rng.choice(VERSIONS)
            return Fuzz("raw", [dump(header, ensure_ascii=rng.random() < 0.5), *payload])
        if r < 0.5:  # a key twice: JSON parsers keep the last
            text = dump(header)
            return Fuzz("raw", [text[:-1] + b',"seq":' + str(rng.choice(HOSTILE_INTS[:6])).encode() + b"}", *payload])
        set_path(header, rng.choice(field_paths(header)), _RAW_MARK)
        return Fuzz("raw", [dump(header, rng.choice(RAW)), *payload])

    def _frames(self) -> Fuzz:
        header, payload = self._small()
        return Fuzz("frames", mutate_frames([dump(header), *payload], self.rng))

    def _bytes(self) -> Fuzz:
        header, payload = self._small()
        donor, _ = self._small()
        return Fuzz("bytes", mutate_bytes([dump(header), *payload], self.rng, dump(donor)))

    def _valid(self) -> Fuzz:
        header, payload = self._small()
        return Fuzz("valid", [dump(header), *payload])

    def _flood(self) -> Fuzz:
        """State the receiver must not keep without bound: trials of runs that never start, each
        under a new session and run, or a new sender."""
        rng = self.rng
        if rng.random() < 0.3:
            header, payload = self._small()
            header["sender_id"], header["seq"] = f"{rng.getrandbits(64):016x}", 0
            return Fuzz("flood", [dump(header), *payload])
        sender, seq = self._envelope()
        header, _ = template("events", rng, sender=sender, seq=seq, session=f"fzw{rng.getrandbits(48):x}",
                             run=rng.choice((rng.randrange(1, 10_000), 2**63 - 1)))
        header["events"] = events(rng, 0, rng.choice((1, 5, 50)))
        return Fuzz("flood", [dump(header)])

    def _huge_message(self) -> Fuzz:
        """Large frames, far fewer than the rest: a 2-16 MB payload or header, 10**4 trials with one
        repeated, 68 frames of 64 KB past the count, or a legal NSD-size volume."""
        rng = self.rng
        self._huge += 1
        size = rng.randrange(2 << 20, 16 << 20)
        header, payload = self._small("volume")
        case = self._huge % 5
        if case == 0:
            return Fuzz("huge", [dump(header), bytes(size)], False)
        if case == 1:  # an unknown field: receivers ignore those, but not of any size
            header["pad"] = "x" * size
            return Fuzz("huge", [dump(header), *payload])
        if case == 2:
            header, _ = self._small("events")
            header["events"] = events(rng, 0, rng.choice((9_999, 10_001, 20_000)))
            header["events"].append(dict(header["events"][0]))  # a trial twice: refused, after a check of all
            return Fuzz("huge", [dump(header)], False)
        if case == 3:
            return Fuzz("huge", [dump(header), *[bytes(1 << 16)] * 68], False)
        header.update(subject="subj01", shape=[81, 104, 83], dtype="int16")
        return Fuzz("huge", [dump(header), volume_bytes((81, 104, 83), "int16")])

    # -- runs the service accepts ---------------------------------------------------------------------

    def _run(self) -> Fuzz:
        rng = self.rng
        live = [run for run in self._runs if not run.ended]
        if not live or (len(live) < 2 and rng.random() < 0.05):  # with the clean run, 3 of the 4 open runs allowed
            return self._start_run()
        run = rng.choice(self._runs)
        if run.ended:  # a resend after the run closed; the last one a run_end, which ends it if a resent
            # run_start (its first, refused for the open-run limit) had opened it only now
            run.after_end += 1
            if run.after_end >= 5:
                self._runs.remove(run)
            type_ = "run_end" if run.after_end >= 5 else rng.choice(("run_start", "events", "volume", "run_end"))
            return self._run_message(run, type_, index=rng.randrange(run.next_index + 2),
                                     n_volumes=run.last_index + 1)
        if run.volumes <= 0:
            run.ended = True
            return self._run_message(run, "run_end", n_volumes=run.last_index + 1)
        r = rng.random()
        if r < 0.15 or not run.scheduled:  # the schedule first, as a stimulus computer sends it
            run.scheduled = True
            return self._run_message(run, "events")
        if r < 0.17:  # run_end with a count it cannot have, then the run goes on
            return self._run_message(run, "run_end", n_volumes=rng.choice((0, 10**6, 10**18, 2**63 - 1)))
        run.volumes -= 1
        return self._run_message(run, "volume", index=self._index(run))

    def _start_run(self) -> Fuzz:
        rng = self.rng
        self._run_counter += 1
        previous = [run for run in self._runs if not run.ended]
        if previous and rng.random() < 0.3:  # the next run of a session, before the previous one's run_end
            session, number = previous[0].session, previous[0].run + 1
            previous[0].volumes = 0  # its run_end follows (if its start was refused, nothing else would end it)
        else:
            session, number = f"fzr{self._run_counter}", rng.randrange(1, 13)
        # the first runs are hostile, each with one of the hostile TRs and dtypes: a short stream takes
        # every one of them to the GLM
        first = self._run_counter <= len(HOSTILE_TR_S)
        hostile = first or rng.random() < 0.3
        tr_s = HOSTILE_TR_S[self._run_counter - 1] if first else (
            rng.choice(HOSTILE_TR_S) if hostile and rng.random() < 0.2 else self.world.tr_s)
        dtype = DTYPES[self._run_counter % 4] if first else rng.choice(("int16",) * 5 + DTYPES[1:])
        run = _Run(session, number, dtype, self.world.tr_s if "tr" in self.skip else tr_s, hostile,
                   volumes=rng.randrange(2, 40), first=first)
        self._runs.append(run)
        ended = [other for other in self._runs if other.ended]
        if len(ended) > 4:  # forget a closed run; an open one is always finished first, or it holds a slot
            self._runs.remove(ended[0])
        if rng.random() < 0.2:  # a run may begin with its first volume
            run.volumes -= 1
            return self._run_message(run, "volume", index=self._index(run))
        return self._run_message(run, "run_start")

    def _index(self, run: _Run) -> int:
        """Mostly the next volume; a repeat, the next but one (the skipped one follows, out of order),
        or - in hostile runs with a sane TR, whose gaps close within a TR - an index far ahead."""
        rng = self.rng
        if run.gap is not None:
            index, run.gap = run.gap, None
            return index
        r = rng.random()
        if r < 0.05 and run.next_index:
            return rng.randrange(run.next_index)
        if r < 0.07 and run.hostile and run.tr_s == self.world.tr_s and "far" not in self.skip:
            index = rng.choice(FAR_INDICES)
            if index < 10_000:
                run.last_index = max(run.last_index, index)
            return index
        index = run.next_index
        run.next_index += 1
        if r < 0.1:
            run.gap, index = index, index + 1
            run.next_index += 1
        run.last_index = max(run.last_index, index)
        return index

    def _run_message(self, run: _Run, type_: str, *, index: int = 0, n_volumes: int = 0) -> Fuzz:
        rng, world = self.rng, self.world
        sender, seq = self._envelope(self._run_seqs)
        geometry = (world.subject, world.shape, world.affine, run.dtype)
        if rng.random() < 0.03:  # the run's other grid: a conflict
            geometry = (world.subject, (*world.shape[:2], world.shape[2] + 1), world.affine,
                        rng.choice(("int16", "float64")))
        header, payload = template(type_, rng, sender=sender, seq=seq, session=run.session, run=run.run,
                                   geometry=geometry, index=index, tr_s=run.tr_s)
        if type_ == "volume" and rng.random() < (0.5 if run.first else 0.1 if run.hostile else 0.02) and (
                "samples" not in self.skip):
            payload = [volume_bytes(tuple(header["shape"]), header["dtype"], rng.choice(("extreme", "nan")))]
        elif type_ == "events":
            first = run.next_trial if rng.random() < 0.9 else rng.choice((0, 10**9, 2**63 - 1))
            n = rng.choice((1, 1, 2, 5)) if rng.random() < 0.98 else rng.choice((200, 1000))
            header["events"] = events(rng, first, n)
            run.next_trial = max(run.next_trial, first + n) if first < 10**9 else run.next_trial
            for event in header["events"] if run.hostile else ():
                name = rng.choice(("onset_s", "duration_s", "image_id", "label", None, None))
                if name in ("onset_s", "duration_s") and "times" not in self.skip:
                    event[name] = rng.choice(HOSTILE_TIMES)
                elif name == "image_id":
                    event[name] = rng.choice((0, 2**63 - 1))
                elif name == "label":
                    event[name] = rng.choice(("", "blank", "x" * 1000, "\u202e\ud800"))
        elif type_ == "run_start":
            header["n_volumes"] = rng.choice((None, None, 10_000, 10**18 if run.hostile else None))
        elif type_ == "run_end":
            header["n_volumes"] = max(0, n_volumes)
        return Fuzz("run", [dump(header), *payload])


def random_messages(seed: int, n: int, world: World | None = None, **options) -> Iterator[list[bytes]]:
    """`n` fuzz messages (lists of frames) from `seed`, as the bulk run sends them."""
    mutator = Mutator(seed, world, **options)
    for _ in range(n):
        yield mutator.message().frames


# ---- the service in a child process ----------------------------------------------------------------------

SUBJECT, SESSION, RUN = 1, 5, 1  # the clean run: as tests/test_realtime_service.py replays it


def _serve(root: str, checkpoint: str, out_dir: str) -> None:
    """The child: the service in a thread, built as RunningService builds it; prints its endpoints,
    then on "stop" (or stdin closed) what became of its threads."""
    import faulthandler
    import logging
    import signal

    import torch
    import zmq

    from realtime.backends import TorchBackend
    from realtime.pipeline import SubjectRois
    from realtime.service import RealtimeService, ServiceSettings

    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a hung thread is, even inside C code
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    levels: Counter = Counter()

    class Count(logging.Handler):
        def emit(self, record):
            levels[record.levelname] += 1

    to_file = logging.FileHandler(Path(out_dir) / "service.log")
    to_file.setLevel(logging.ERROR)  # the refusals' warnings are counted, not written: a million of them
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[to_file, Count()], force=True)
    threading.excepthook = lambda args: errors.append(
        f"thread {args.thread.name}: " + "".join(traceback.format_exception(args.exc_value)))

    backend = TorchBackend.from_checkpoint(Path(checkpoint), bank=None, prior_steps=2)
    service = RealtimeService(ServiceSettings(Path(out_dir), "tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                                              journal_fsync="never"),
                              backend, SubjectRois.from_layout(Path(root), ["subj01"]), context=zmq.Context())
    stop = threading.Event()
    ingest = threading.Thread(target=service.run, args=(stop,), name="ingest", daemon=True)
    ingest.start()
    if not service.ready.wait(60):
        print("FUZZ " + json.dumps({"error": "the service did not start within 60 s", "errors": errors}), flush=True)
        os._exit(1)
    print("FUZZ " + json.dumps({"volumes": service.volumes_endpoint}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    alive = {t.name: t.is_alive() for t in threading.enumerate() if t.name in ("ingest", "decode")}
    final = {"ingest_alive": alive.get("ingest", False), "decode_alive": alive.get("decode", False)}
    try:
        final["status"] = service.status()
    except Exception as error:  # noqa: BLE001 - a report, whatever state the service is in
        final["status"] = {"error": repr(error)}
    stop.set()
    ingest.join(30)
    final.update(stopped=not ingest.is_alive(), errors=errors, log_levels=dict(levels))
    print("FUZZ " + json.dumps(final, default=str), flush=True)
    os._exit(0)  # a hung thread must not keep the child alive


class ServiceProcess:
    """`_serve` in a child process: its endpoint, its memory, and its end (killed if need be)."""

    def __init__(self, root: Path, checkpoint: Path, out_dir: Path, start_timeout_s: float = 180.0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(out_dir / "service.stderr", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, __file__, "serve", str(root), str(checkpoint), str(out_dir)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                        text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._line(start_timeout_s)
        if ready is None or "volumes" not in ready:
            self.kill()
            tail = (out_dir / "service.stderr").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the service did not start: {ready}; the end of its stderr:\n{tail}")
        self.endpoint = ready["volumes"]

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("FUZZ "):
                self._lines.put(json.loads(line[5:]))
        self._lines.put(None)

    def _line(self, timeout_s: float) -> dict | None:
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the child in MB; (0, 0) once it is gone."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0.0, 0.0
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return tuple(int(values.get(key, "0 kB").split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))

    def dump_stacks(self) -> None:
        """Every thread's stack into service.stderr (faulthandler, on SIGUSR1)."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGUSR1)
            time.sleep(1.0)

    def stop(self, timeout_s: float = 60.0) -> dict | None:
        """What the child says of its threads, or None if it had died or did not answer in time."""
        report = None
        if self.alive():
            try:
                self.process.stdin.write("stop\n")
                self.process.stdin.flush()
                report = self._line(timeout_s)
            except (BrokenPipeError, OSError):
                pass
        self.kill()
        return report

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(30)
        self._stderr.close()


# ---- the harness -----------------------------------------------------------------------------------------

@dataclass
class _Sent:
    at_s: float
    seq: int | None  # the header's seq as the service may read it; None when it cannot
    kind: str


@dataclass
class _Lane:
    """One DEALER and the messages it still waits for the acks of (acks come back in order)."""

    socket: object
    pending: deque = field(default_factory=deque)
    last_answered: str | None = None  # the kind of message


@dataclass
class FuzzReport:
    messages: int = 0  # fuzz messages sent
    elapsed_s: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    acks: Counter = field(default_factory=Counter)  # fuzz acks, "verdict:reason"
    clean_acks: Counter = field(default_factory=Counter)
    resend_acks: Counter = field(default_factory=Counter)
    missing_acks: int = 0  # messages never answered (within ack_timeout_s)
    extra_acks: int = 0  # answers beyond one per message
    misaligned_acks: int = 0  # an acked_seq that is not the seq of the message it answers
    unreadable_acks: int = 0
    max_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    rss_mb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # at start, peak, end
    rss_trace: list[tuple[int, float]] = field(default_factory=list)  # (messages sent, RSS MB) each tenth
    journal_bytes: int = 0
    journal_bound: int = 0  # decodable messages in full, refused ones at 4 KB each
    aborted: str | None = None  # why the run stopped early (a hang, a dead service, memory, the journal)
    service: dict | None = None  # what the child said at the end (None: dead or hung)
    stderr_tail: str = ""
    clean_trials: list[int] = field(default_factory=list)
    published: Counter = field(default_factory=Counter)  # clean trial -> results published
    betas_file: Path | None = None
    ack_timeout_s: float = 5.0

    def problems(self, max_rss_growth_mb: float) -> list[str]:
        """What broke the service's promises, one line each (empty: none)."""
        found = []
        if self.aborted:
            stacks = self.stderr_tail[self.stderr_tail.find("Thread 0x"):] if "Thread 0x" in self.stderr_tail else ""
            found.append(f"aborted: {self.aborted}" + (f"; every thread's stack then:\n{stacks}" if stacks else ""))
        service = self.service or {}
        if not service:
            found.append(f"the service did not answer at the end (dead or hung); the end of its stderr:\n"
                         f"{self.stderr_tail[-1500:]}")
        else:
            if not service.get("ingest_alive"):
                found.append("the ingest thread died")
            if not service.get("decode_alive"):
                found.append("the decode thread died")
            if service.get("errors"):
                found.append("uncaught exceptions:\n" + "\n".join(e[-1500:] for e in service["errors"][:3]))
            if service.get("log_levels", {}).get("ERROR") or service.get("log_levels", {}).get("CRITICAL"):
                found.append(f"errors logged: {service['log_levels']} (service.log)")
        if self.missing_acks or self.extra_acks or self.misaligned_acks or self.unreadable_acks:
            found.append(f"acks: {self.missing_acks} missing, {self.extra_acks} extra, {self.misaligned_acks} "
                         f"misaligned, {self.unreadable_acks} unreadable")
        if self.max_latency_ms > self.ack_timeout_s * 1000:
            found.append(f"slowest ack {self.max_latency_ms:.0f} ms > {self.ack_timeout_s:.0f} s")
        if set(self.clean_acks) != {"accepted"}:
            found.append(f"the clean run's acks: {dict(self.clean_acks)} (all should be accepted)")
        wrong = {t: n for t, n in self.published.items() if n != 1}
        missing = [t for t in self.clean_trials if t not in self.published]
        if wrong or missing or set(self.published) - set(self.clean_trials):
            found.append(f"clean trials not published exactly once: missing {missing}, counts {wrong}")
        if self.journal_bytes > self.journal_bound:
            found.append(f"journal {self.journal_bytes} bytes > bound {self.journal_bound}")
        growth = self.rss_mb[2] - self.rss_mb[0]
        if growth > max_rss_growth_mb:
            found.append(f"RSS grew {growth:.0f} MB (start {self.rss_mb[0]:.0f}, peak {self.rss_mb[1]:.0f}, end "
                         f"{self.rss_mb[2]:.0f}) > {max_rss_growth_mb:.0f} MB")
        return found

    def format(self, max_rss_growth_mb: float) -> str:
        def listing(counter: Counter) -> str:
            return ", ".join(f"{key} {n}" for key, n in counter.most_common()) or "none"

        service = self.service or {}
        published_once = sum(self.published.get(t) == 1 for t in self.clean_trials)
        lines = [
            f"fuzz messages sent: {self.messages} in {self.elapsed_s:.1f} s, "
            f"{self.messages / max(self.elapsed_s, 1e-9):.0f} messages/s",
            f"  by kind: {listing(self.kinds)}",
            f"acks of the fuzz messages, by verdict:reason: {listing(self.acks)}",
            f"  missing (hangs) {self.missing_acks}, extra {self.extra_acks}, misaligned {self.misaligned_acks}, "
            f"unreadable {self.unreadable_acks}",
            f"  latency, send to ack: max {self.max_latency_ms:.1f} ms, p99 {self.p99_latency_ms:.1f} ms "
            f"(bound {self.ack_timeout_s * 1000:.0f} ms)",
            f"service RSS (MB): start {self.rss_mb[0]:.0f}, peak {self.rss_mb[1]:.0f}, end {self.rss_mb[2]:.0f} "
            f"(growth bound {max_rss_growth_mb:.0f}); by messages sent: "
            + ", ".join(f"{n} {rss:.0f}" for n, rss in self.rss_trace),
            f"journal: {self.journal_bytes} bytes, bound {self.journal_bound} (decodable messages in full, "
            f"refused ones 4 KB each)",
            f"crashes: ingest thread {'alive' if service.get('ingest_alive') else 'DEAD or hung'}, decode thread "
            f"{'alive' if service.get('decode_alive') else 'DEAD or hung'}, "
            f"{len(service.get('errors', []))} uncaught exceptions, log records {service.get('log_levels', {})}",
            f"clean run (session subj01-nsd{SESSION:02d}, run {RUN}): acks {listing(self.clean_acks)}; resent after it "
            f"closed: {listing(self.resend_acks)}",
            f"  trials decoded once: {published_once} of {len(self.clean_trials)}"
            + (f"; published counts {dict(self.published)}" if published_once != len(self.clean_trials) else ""),
            f"aborted: {self.aborted or 'no'}"]
        problems = self.problems(max_rss_growth_mb)
        lines.append("problems: " + ("none" if not problems else "\n  " + "\n  ".join(problems)))
        return "\n".join(lines)


def _inspect(fuzz: Fuzz) -> tuple[int | None, bool]:
    """(the seq the service can read from the header, whether `decode` takes the message)."""
    seq = None
    if len(fuzz.frames[0]) < (1 << 20):
        try:
            header = json.loads(fuzz.frames[0])
            value = header.get("seq") if isinstance(header, dict) else None
            seq = value if isinstance(value, int) and not isinstance(value, bool) else None
        except (ValueError, RecursionError):
            pass
    if fuzz.decodable is not None:
        return seq, fuzz.decodable
    try:
        decode(fuzz.frames)
        return seq, True
    except Exception:  # noqa: BLE001 - a crash in decode is the service's to show; here it only sizes a bound
        return seq, False


def _record_bytes(frames: list[bytes]) -> int:
    return 32 + 8 * len(frames) + sum(len(f) for f in frames)  # what mindeye.journal writes per record


def clean_messages(root: Path) -> tuple[list[Message], list[int]]:
    """The clean run as the replayer sends it (envelopes unset), and its trials."""
    from mindeye.nsd import NSDLayout
    from simulators.replay.sources import NSDSource

    plan = next(NSDSource(NSDLayout(Path(root)), SUBJECT, SESSION, [RUN]).runs())
    messages = [item.message for item in plan]
    trials = [e.trial for m in messages if m.TYPE == "events" for e in m.events if e.label != "blank"]
    return messages, trials


def fuzz_service(root: Path, checkpoint: Path, out_dir: Path, *, messages: int, seconds: float, seed: int = 0,
                 window: int = 16, ack_timeout_s: float = 5.0, rss_cap_mb: float = 4096.0, huge_every: int = 1000,
                 skip=(), progress: Callable[[int], None] | None = None) -> FuzzReport:
    """Stream up to `messages` fuzz messages for at most `seconds` at a service on the world in
    `root`, at most `window` unanswered at a time, interleaved with a clean run sent over the first
    half (its run_start first, so the fuzz cannot take its place) and resent once it closed.

    Stops early, killing the service, on a hang (no ack within `ack_timeout_s`), a dead service,
    RSS over `rss_cap_mb` or a journal over its bound (so a bug costs neither the machine's memory
    nor its disk)."""
    import zmq

    out_dir = Path(out_dir)
    report = FuzzReport(ack_timeout_s=ack_timeout_s)
    mutator = Mutator(seed, World.of(root, SUBJECT), huge_every=huge_every, skip=skip)
    clean, report.clean_trials = clean_messages(root)
    service = ServiceProcess(Path(root), Path(checkpoint), out_dir)
    context = zmq.Context()
    latencies = array("d")
    journal = out_dir / "journal.mej"
    bound = 12  # the journal's file header

    def dealer():
        socket = context.socket(zmq.DEALER)
        socket.linger, socket.sndtimeo = 0, int(ack_timeout_s * 1000)
        socket.connect(service.endpoint)
        return socket

    def send(lane: _Lane, frames: list[bytes], seq: int | None, kind: str) -> None:
        lane.socket.send_multipart(frames, copy=False)
        lane.pending.append(_Sent(time.monotonic(), seq, kind))

    def send_clean(lane: _Lane, stamper: Stamper, message: Message) -> None:
        nonlocal bound
        envelope = stamper.envelope()
        frames = encode(replace(message, envelope=envelope))
        bound += _record_bytes(frames)
        send(lane, frames, envelope.seq, "clean")

    def read_acks(lane: _Lane, counter: Counter) -> None:
        while lane.socket.poll(0, zmq.POLLIN):
            answer = lane.socket.recv_multipart()
            if not lane.pending:
                report.extra_acks += 1
                continue
            sent = lane.pending.popleft()
            lane.last_answered = sent.kind
            latencies.append((time.monotonic() - sent.at_s) * 1000)
            try:
                ack = decode(answer)
                if not isinstance(ack, Ack):
                    raise ProtocolError("not_object", f"a {ack.TYPE} where an ack belongs")
            except ProtocolError:
                report.unreadable_acks += 1
                continue
            counter[str(ack.verdict) + (f":{ack.reason}" if ack.reason else "")] += 1
            if ack.acked_seq is not None and ack.acked_seq != sent.seq:
                report.misaligned_acks += 1
            if lane is fuzz and progress is not None:
                progress(1)

    fuzz, clean_lane = _Lane(dealer()), _Lane(dealer())
    resend: _Lane | None = None
    lanes = [(fuzz, report.acks), (clean_lane, report.clean_acks)]
    clean_stamper, next_clean = Stamper(), 0
    started = time.monotonic()
    report.rss_mb = (service.memory_mb()[0], 0.0, 0.0)
    next_check = 0.0

    def done_now() -> float:
        return max(report.messages / messages, (time.monotonic() - started) / seconds)

    def check(now: float) -> str | None:
        """Why the run must stop now, if it must."""
        for lane, _ in lanes:
            if lane.pending and now - lane.pending[0].at_s > ack_timeout_s:
                sent = lane.pending[0]
                return (f"hang: no ack within {ack_timeout_s:.0f} s for a '{sent.kind}' message (seq {sent.seq}); "
                        f"the one answered before it, whose processing follows its ack: '{lane.last_answered}'")
        if not service.alive():
            return f"the service process exited with {service.process.returncode}"
        rss, _ = service.memory_mb()
        if done_now() >= 0.1 * (len(report.rss_trace) + 1):
            report.rss_trace.append((report.messages, rss))
        if rss > rss_cap_mb:
            return f"service RSS {rss:.0f} MB over the cap of {rss_cap_mb:.0f} MB"
        if journal.is_file() and journal.stat().st_size > bound:
            return f"journal {journal.stat().st_size} bytes over its bound {bound} (full copies of refused messages?)"
        return None

    try:
        for message in clean[:2]:  # run_start and events: the run is open before any fuzz
            send_clean(clean_lane, clean_stamper, message)
        next_clean = 2
        while report.aborted is None:
            now = time.monotonic()
            done = done_now()
            resend_due = resend is None and next_clean == len(clean) and not clean_lane.pending and done >= 0.75
            if done >= 1 and not resend_due:
                break
            while next_clean < len(clean) and done >= 0.5 * next_clean / len(clean):
                send_clean(clean_lane, clean_stamper, clean[next_clean])
                next_clean += 1
            if resend_due:  # a restarted sender resends the whole run, after it closed
                resend = _Lane(dealer())
                lanes.append((resend, report.resend_acks))
                stamper = Stamper()
                for message in clean:
                    send_clean(resend, stamper, message)
            if len(fuzz.pending) < window and done < 1:
                item = mutator.message()
                seq, decodable = _inspect(item)
                bound += _record_bytes(item.frames) if decodable else 4096
                send(fuzz, item.frames, seq, item.kind)
                report.messages += 1
                report.kinds[item.kind] += 1
            else:
                zmq.select([lane.socket for lane, _ in lanes], [], [], 0.02)
            for lane, counter in lanes:
                read_acks(lane, counter)
            if now >= next_check:
                next_check = now + 0.25
                report.aborted = check(now)
        while report.aborted is None and any(lane.pending for lane, _ in lanes):  # the last acks
            zmq.select([lane.socket for lane, _ in lanes], [], [], 0.05)
            for lane, counter in lanes:
                read_acks(lane, counter)
            report.aborted = check(time.monotonic())
        report.elapsed_s = time.monotonic() - started
        if report.aborted is None:
            _wait_for_results(out_dir, report, timeout_s=90.0)
    except zmq.Again:
        report.aborted = f"send blocked for {ack_timeout_s:.0f} s: the service takes no more messages"
    finally:
        report.elapsed_s = report.elapsed_s or time.monotonic() - started
        report.missing_acks = sum(len(lane.pending) for lane, _ in lanes)
        rss, peak = service.memory_mb()
        report.rss_mb = (report.rss_mb[0], peak, rss)
        if report.aborted:
            service.dump_stacks()
        report.service = service.stop(timeout_s=60.0)  # the child waits 30 s for the ingest thread's own shutdown
        for lane, _ in lanes:
            lane.socket.close(0)
        context.term()
    report.stderr_tail = (out_dir / "service.stderr").read_text(errors="replace")[-6000:]
    report.journal_bytes = journal.stat().st_size if journal.is_file() else 0
    report.journal_bound = bound
    report.published = _published(out_dir)
    if latencies:
        ordered = np.sort(np.frombuffer(latencies, dtype=np.float64))
        report.max_latency_ms, report.p99_latency_ms = float(ordered[-1]), float(np.percentile(ordered, 99))
    betas = out_dir / "betas" / f"subj01-nsd{SESSION:02d}_run-{RUN:02d}.npz"
    report.betas_file = betas if betas.is_file() else None
    return report


def _published(out_dir: Path) -> Counter:
    """Clean trial -> times published in results.jsonl."""
    path = out_dir / "results.jsonl"
    counts: Counter = Counter()
    if path.is_file():
        for line in path.read_text().splitlines():
            result = json.loads(line)
            if result.get("session") == f"subj01-nsd{SESSION:02d}" and result.get("run") == RUN:
                counts[result["trial"]] += 1
    return counts


def _wait_for_results(out_dir: Path, report: FuzzReport, timeout_s: float) -> None:
    """Until every clean trial is published (then a moment more, for a second copy to show)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not set(report.clean_trials) <= set(_published(out_dir)):
        time.sleep(0.2)
    time.sleep(1.0)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, from any cwd
    _serve(*sys.argv[2:5])
