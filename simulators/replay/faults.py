"""Fault injection: what goes wrong between a scanner and the realtime service, on purpose and on record.

`apply_faults(plan, faults, seed)` turns one run's plan into the plan actually sent, and returns one
JSON-ready record per fault (the fault log), naming the message it hit (type, session, run, volume
index) and what was done. Tests of the service read the log to know which volumes, and so which
trials, a fault can touch. Each fault draws from its own generator seeded by (seed, fault, run): the
same seed gives the same faults, and enabling one fault does not move another.

Faults are applied in a fixed order: drop; content (nan, wrong_shape, wrong_dtype, truncate,
corrupt); duplicate; reorder; delay and jitter; sender restart. A later fault only sees what the
earlier ones left (a dropped volume is not also duplicated). Content faults are logged with
`decode_error`: the protocol reason code `decode` raises on the faulted frames, or null when they
still decode (a consistent volume on another grid or dtype: a receiver refuses it as `conflict`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mindeye.protocol import DTYPES, Events, ProtocolError, RunStart, Volume, decode, encode
from simulators.replay.sources import RESTART, Outgoing

FAULT_NAMES = ("drop", "duplicate", "reorder", "delay", "jitter", "truncate", "corrupt", "wrong_shape",
               "wrong_dtype", "nan", "restart")  # append only: a fault's seed stream is keyed by its position
RUN_MESSAGES = ("run_start", "events", "run_end")


# ---- configuration -----------------------------------------------------------------------------------

def _check_choice(name: str, values: tuple, allowed: tuple) -> None:
    wrong = [v for v in values if v not in allowed]
    if wrong:
        raise ValueError(f"{name}: {wrong} not among {list(allowed)}")


def _check_not_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Pick:
    """Which volumes a fault hits: every volume whose index is in `indices`, and each other volume
    with `probability`; in every run, or only in `runs`."""

    probability: float = 0.0
    indices: tuple[int, ...] = ()
    runs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"{type(self).__name__}: probability must be in [0, 1], got {self.probability}")
        if any(not isinstance(i, int) or i < 0 for i in self.indices):
            raise ValueError(f"{type(self).__name__}: indices must be volume indices >= 0, got {list(self.indices)}")

    def choose(self, plan: list[Outgoing], rng: np.random.Generator) -> list[int]:
        """Positions in `plan` of the volumes hit. One draw per candidate volume, listed or not, so the
        draws do not depend on `indices`."""
        candidates = [p for p, item in enumerate(plan)
                      if item.type == Volume.TYPE and (self.runs is None or item.run in self.runs)]
        draws = rng.random(len(candidates))
        return [p for p, u in zip(candidates, draws) if plan[p].index in self.indices or u < self.probability]


@dataclass(frozen=True)
class Drop(Pick):
    messages: tuple[str, ...] = ()  # also drop these run messages: run_start, events, run_end

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("drop.messages", self.messages, RUN_MESSAGES)


@dataclass(frozen=True)
class Duplicate(Pick):
    after_s: float = 0.0  # the second copy goes this long after the first

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_not_negative("duplicate.after_s", self.after_s)


@dataclass(frozen=True)
class Reorder(Pick):
    window: int = 2  # a picked volume swaps places with one 1 .. window volumes later

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"reorder.window must be >= 1, got {self.window}")


@dataclass(frozen=True)
class Delay(Pick):
    delay_s: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_not_negative("delay.delay_s", self.delay_s)


@dataclass(frozen=True)
class Jitter:
    max_s: float = 0.0  # every message goes late by a uniform draw in [0, max_s]

    def __post_init__(self) -> None:
        _check_not_negative("jitter.max_s", self.max_s)


@dataclass(frozen=True)
class Truncate(Pick):
    keep_fraction: float = 0.5  # of the volume frame's bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.keep_fraction < 1.0:
            raise ValueError(f"truncate.keep_fraction must be in [0, 1), got {self.keep_fraction}")


@dataclass(frozen=True)
class Corrupt(Pick):
    mode: str = "flip"  # flip: the high bit of n_bytes header bytes (invalid UTF-8); cut: the header cut short
    n_bytes: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("corrupt.mode", (self.mode,), ("flip", "cut"))
        if self.n_bytes < 1:
            raise ValueError(f"corrupt.n_bytes must be >= 1, got {self.n_bytes}")


@dataclass(frozen=True)
class WrongShape(Pick):
    mode: str = "header"  # header: claims one more slice than the bytes hold; grid: a whole volume minus its last slice

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("wrong_shape.mode", (self.mode,), ("header", "grid"))


@dataclass(frozen=True)
class WrongDtype(Pick):
    mode: str = "header"  # header: names `dtype` over the original bytes; data: samples converted to `dtype`
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("wrong_dtype.mode", (self.mode,), ("header", "data"))
        if self.mode == "data":
            _check_choice("wrong_dtype.dtype", (self.dtype,), DTYPES)


@dataclass(frozen=True)
class Nan(Pick):
    fraction: float = 0.01  # of the voxels set to NaN; 1.0: the whole volume

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"nan.fraction must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class Restart:
    """The sender process restarts before volume `at_index` (new sender id, seq from 0, a new
    connection), sends the run's `run_start` and trials again, and goes on from `resume_from`
    (default `at_index`; lower re-sends volumes, higher skips some)."""

    at_index: int | None = None  # None: no restart
    resume_from: int | None = None
    downtime_s: float = 0.0
    runs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("at_index", "resume_from", "downtime_s"):
            if getattr(self, name) is not None:
                _check_not_negative(f"restart.{name}", getattr(self, name))


@dataclass(frozen=True)
class Faults:
    drop: Drop = Drop()
    duplicate: Duplicate = Duplicate()
    reorder: Reorder = Reorder()
    delay: Delay = Delay()
    jitter: Jitter = Jitter()
    truncate: Truncate = Truncate()
    corrupt: Corrupt = Corrupt()
    wrong_shape: WrongShape = WrongShape()
    wrong_dtype: WrongDtype = WrongDtype()
    nan: Nan = Nan()
    restart: Restart = Restart()

    @classmethod
    def from_config(cls, config: Mapping | DictConfig | None) -> Faults:
        """Faults from a `faults:` config mapping (lists become tuples); unknown names are errors."""
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        defaults = cls()
        names = [f.name for f in fields(cls)]
        options: dict[str, Any] = {}
        for name, values in (config or {}).items():
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(names)}")
            kind = type(getattr(defaults, name))
            known = {f.name for f in fields(kind)}
            if set(values) - known:
                raise ValueError(f"faults.{name}: unknown option(s) {sorted(set(values) - known)}; known: "
                                 f"{sorted(known)}")
            options[name] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return cls(**options)


# ---- frame-level tampering (applied to the encoded frames at send time) ----------------------------

@dataclass(frozen=True)
class CutFrame:
    """Keep the first `keep_fraction` of the volume frame's bytes."""

    keep_fraction: float

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        data = bytes(frames[1])
        return [frames[0], data[:int(len(data) * self.keep_fraction)], *frames[2:]]


@dataclass(frozen=True)
class FlipHighBits:
    """XOR 0x80 into the header bytes at these fractions of its length: an ASCII byte becomes a byte
    that cannot stand there in UTF-8, so the header is no longer text."""

    at_fractions: tuple[float, ...]

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        header = bytearray(frames[0])
        for position in sorted({int(u * len(header)) for u in self.at_fractions}):
            header[position] ^= 0x80
        return [bytes(header), *frames[1:]]


@dataclass(frozen=True)
class CutHeader:
    """Keep the first `keep_fraction` of the JSON header: an object cut short is never valid JSON."""

    keep_fraction: float

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        header = bytes(frames[0])
        return [header[:int(len(header) * self.keep_fraction)], *frames[1:]]


@dataclass(frozen=True)
class SetHeaderField:
    """Rewrite one field of the JSON header, leaving the payload as it was."""

    name: str
    value: Any

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        header = json.loads(bytes(frames[0]))
        header[self.name] = self.value
        return [json.dumps(header, separators=(",", ":")).encode(), *frames[1:]]


# ---- applying faults to one run ----------------------------------------------------------------------

def apply_faults(plan: list[Outgoing], faults: Faults, seed: int) -> tuple[list[Outgoing], list[dict]]:
    """(the run's plan with `faults` injected, the fault log records), deterministic from `seed`."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    run = next((item.run for item in plan if item.run is not None), 0)

    def rng(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, FAULT_NAMES.index(name), run])

    clean, log = plan, []
    plan = _drop(plan, faults.drop, rng("drop"), log)
    plan = _content(plan, faults, rng, log)
    plan = _duplicate(plan, faults.duplicate, rng("duplicate"), log)
    plan = _reorder(plan, faults.reorder, rng("reorder"), log)
    plan = _delay(plan, faults.delay, faults.jitter, rng("delay"), rng("jitter"), log)
    plan = _restart(plan, clean, faults.restart, log)
    return plan, log


def _record(fault: str, item: Outgoing, **details) -> dict:
    return {"fault": fault, **item.describe(), **details}


def _drop(plan, drop: Drop, rng, log) -> list[Outgoing]:
    hit = set(drop.choose(plan, rng))
    hit |= {p for p, item in enumerate(plan) if item.type in drop.messages
            and (drop.runs is None or item.run in drop.runs)}
    log += [_record("drop", plan[p]) for p in sorted(hit)]
    return [item for p, item in enumerate(plan) if p not in hit]


def _content(plan, faults: Faults, rng, log) -> list[Outgoing]:
    """NaN, wrong shape, wrong dtype, truncated and corrupt frames; each record then gets the reason
    code `decode` gives the faulted frames."""
    plan = list(plan)
    records: dict[int, list[dict]] = {}
    for name, inject in (("nan", _nan), ("wrong_shape", _wrong_shape), ("wrong_dtype", _wrong_dtype),
                         ("truncate", _truncate), ("corrupt", _corrupt)):
        fault, fault_rng = getattr(faults, name), rng(name)
        for p in fault.choose(plan, fault_rng):
            plan[p], details = inject(plan[p], fault, fault_rng)
            records.setdefault(p, []).append(_record(name, plan[p], **details))
    for p, item_records in sorted(records.items()):
        reason = _decode_error(plan[p])
        log += [{**record, "decode_error": reason} for record in item_records]
    return plan


def _nan(item: Outgoing, nan: Nan, rng) -> tuple[Outgoing, dict]:
    volume_xyz = np.array(_volume_of(item).array())  # a writable copy
    if not np.issubdtype(volume_xyz.dtype, np.floating):
        raise ValueError(f"nan fault: run {item.run} has {volume_xyz.dtype} volumes, which cannot hold NaN; "
                         f"replay it with dtype=float32")
    n_voxels = max(1, round(nan.fraction * volume_xyz.size))
    volume_xyz.reshape(-1)[rng.choice(volume_xyz.size, n_voxels, replace=False)] = np.nan
    return _with_array(item, volume_xyz), {"n_voxels": int(n_voxels)}


def _wrong_shape(item: Outgoing, wrong: WrongShape, rng) -> tuple[Outgoing, dict]:
    volume = _volume_of(item)
    x, y, z = volume.shape
    if wrong.mode == "header":
        return _tampered(item, SetHeaderField("shape", [x, y, z + 1])), {"mode": "header", "shape": [x, y, z + 1]}
    if z < 2:
        raise ValueError(f"wrong_shape grid: run {item.run} volumes have {z} slice(s); none can go")
    return _with_array(item, volume.array()[:, :, :-1]), {"mode": "grid", "shape": [x, y, z - 1]}


def _wrong_dtype(item: Outgoing, wrong: WrongDtype, rng) -> tuple[Outgoing, dict]:
    volume = _volume_of(item)
    if volume.dtype == wrong.dtype:
        raise ValueError(f"wrong_dtype: run {item.run} volumes are {volume.dtype} already; "
                         f"choose another wrong_dtype.dtype")
    details = {"mode": wrong.mode, "dtype": wrong.dtype, "original_dtype": volume.dtype}
    if wrong.mode == "header":
        return _tampered(item, SetHeaderField("dtype", wrong.dtype)), details
    return _with_array(item, volume.array().astype(wrong.dtype)), details


def _truncate(item: Outgoing, truncate: Truncate, rng) -> tuple[Outgoing, dict]:
    return _tampered(item, CutFrame(truncate.keep_fraction)), {"keep_fraction": truncate.keep_fraction}


def _corrupt(item: Outgoing, corrupt: Corrupt, rng) -> tuple[Outgoing, dict]:
    if corrupt.mode == "flip":
        tamper = FlipHighBits(tuple(float(u) for u in rng.random(corrupt.n_bytes)))
        return _tampered(item, tamper), {"mode": "flip", "at_fractions": list(tamper.at_fractions)}
    tamper = CutHeader(float(rng.uniform(0.1, 0.9)))
    return _tampered(item, tamper), {"mode": "cut", "keep_fraction": tamper.keep_fraction}


def _duplicate(plan, duplicate: Duplicate, rng, log) -> list[Outgoing]:
    hit = set(duplicate.choose(plan, rng))
    out = []
    for p, item in enumerate(plan):
        out.append(item)
        if p in hit:
            out.append(replace(item, at_s=item.at_s + duplicate.after_s))
            log.append(_record("duplicate", item, after_s=duplicate.after_s))
    return _by_time(out)


def _reorder(plan, reorder: Reorder, rng, log) -> list[Outgoing]:
    plan = list(plan)
    volume_positions = [p for p, item in enumerate(plan) if item.type == Volume.TYPE]
    slot_of = {p: k for k, p in enumerate(volume_positions)}
    swapped: set[int] = set()
    for p in reorder.choose(plan, rng):
        q_slot = slot_of[p] + int(rng.integers(1, reorder.window + 1))
        if p in swapped or q_slot >= len(volume_positions) or volume_positions[q_slot] in swapped:
            continue
        q = volume_positions[q_slot]
        log.append(_record("reorder", plan[p], swapped_with=plan[q].index))
        plan[p], plan[q] = replace(plan[q], at_s=plan[p].at_s), replace(plan[p], at_s=plan[q].at_s)
        swapped |= {p, q}
    return plan


def _delay(plan, delay: Delay, jitter: Jitter, delay_rng, jitter_rng, log) -> list[Outgoing]:
    plan = list(plan)
    for p in delay.choose(plan, delay_rng):
        log.append(_record("delay", plan[p], delay_s=delay.delay_s))
        plan[p] = replace(plan[p], at_s=plan[p].at_s + delay.delay_s)
    if jitter.max_s > 0:
        late_s = jitter_rng.uniform(0.0, jitter.max_s, len(plan))
        log += [_record("jitter", item, delay_s=float(d)) for item, d in zip(plan, late_s)]
        plan = [replace(item, at_s=item.at_s + float(d)) for item, d in zip(plan, late_s)]
    return _by_time(plan)


def _restart(plan, clean, restart: Restart, log) -> list[Outgoing]:
    run = next((item.run for item in clean if item.run is not None), None)
    if restart.at_index is None or (restart.runs is not None and run not in restart.runs):
        return plan
    if any(item.frames is not None for item in clean):
        raise ValueError("restart fault: a journal is replayed with its recorded senders; a restart needs a "
                         "source that builds messages (nsd, nifti)")
    at = next((p for p, item in enumerate(plan) if item.type == Volume.TYPE and item.index >= restart.at_index), None)
    if at is None:
        return plan
    resume_from = restart.at_index if restart.resume_from is None else restart.resume_from
    restart_s, back_s = plan[at].at_s, plan[at].at_s + restart.downtime_s
    # The new sender announces the run again, then re-sends from resume_from what it had already sent.
    resent = [replace(item, at_s=back_s) for item in clean
              if (item.type in (RunStart.TYPE, Events.TYPE) and item.at_s <= restart_s)
              or (item.type == Volume.TYPE and resume_from <= item.index < restart.at_index)]
    skipped = range(restart.at_index, resume_from)
    rest = [replace(item, at_s=max(item.at_s, back_s)) for item in plan[at:]
            if not (item.type == Volume.TYPE and item.index in skipped)]
    marker = Outgoing(restart_s, RESTART, plan[at].session, run, None)
    log.append(_record("restart", marker, at_index=restart.at_index, resume_from=resume_from,
                       resent=[item.index for item in resent if item.type == Volume.TYPE],
                       skipped=list(skipped), downtime_s=restart.downtime_s))
    return plan[:at] + [marker] + resent + rest


# ---- helpers -----------------------------------------------------------------------------------------

def _by_time(plan: list[Outgoing]) -> list[Outgoing]:
    return sorted(plan, key=lambda item: item.at_s)  # stable


def _tampered(item: Outgoing, tamper) -> Outgoing:
    return replace(item, tampers=item.tampers + (tamper,))


def _volume_of(item: Outgoing) -> Volume:
    return item.message if item.message is not None else decode(item.frames)


def _with_array(item: Outgoing, volume_xyz: np.ndarray) -> Outgoing:
    """`item` carrying `volume_xyz` instead (any shape or dtype), all other fields kept. A recorded
    item is re-encoded with its recorded envelope."""
    v = _volume_of(item)
    volume = Volume.from_array(volume_xyz, session=v.session, subject=v.subject, run=v.run, index=v.index,
                               acq_time_s=v.acq_time_s, tr_s=v.tr_s, affine=v.affine, envelope=v.envelope)
    if item.frames is not None:
        return replace(item, frames=tuple(bytes(frame) for frame in encode(volume)))
    return replace(item, message=volume)


def _decode_error(item: Outgoing) -> str | None:
    frames = list(item.frames) if item.frames is not None else [bytes(f) for f in encode(item.message)]
    for tamper in item.tampers:
        frames = tamper(frames)
    try:
        decode(frames)
    except ProtocolError as error:
        return str(error.code)
    return None
