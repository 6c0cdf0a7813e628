"""Fuzzing the volume socket (issue 9): `decode` alone under hypothesis, then the whole service under
a stream of hostile messages with a clean run interleaved.

No message may crash or stall the service: each gets exactly one ack, soon; memory and the journal
stay bounded; and a valid run sent meanwhile is decoded exactly once, with the betas of a clean
run. The stream (tests/fuzz_messages.py) runs for MINDEYE_FUZZ_SECONDS (default 25 s) or
MINDEYE_FUZZ_MESSAGES messages, whichever ends first, from seed MINDEYE_FUZZ_SEED (default 0); the
service's RSS may grow MINDEYE_FUZZ_RSS_MB (default 256); MINDEYE_FUZZ_SKIP (comma-separated) leaves
out what `fuzz_messages.Mutator` names, to see what else fails while one bug is open. `-m slow` sends
1,000,000 (~20 min).
benchmarks/fuzz_service.py runs the same harness and prints its figures.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_messages as fm
from mindeye.protocol import Ack, Message, ProtocolError, Stamper, Verdict, decode, encode
from simulators.world.untrained import untrained_checkpoint
from test_realtime_service import expected_betas

# hypothesis caches what it learns under .hypothesis/ in the working directory: not in the repository
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "mindeye-hypothesis"))
FUZZ_SECONDS = float(os.environ.get("MINDEYE_FUZZ_SECONDS", "25"))
FUZZ_MESSAGES = int(os.environ.get("MINDEYE_FUZZ_MESSAGES", str(10**12)))
MAX_RSS_GROWTH_MB = float(os.environ.get("MINDEYE_FUZZ_RSS_MB", "256"))
FUZZ_SEED = int(os.environ.get("MINDEYE_FUZZ_SEED", "0"))
FUZZ_SKIP = [name for name in os.environ.get("MINDEYE_FUZZ_SKIP", "").split(",") if name]  # see fm.Mutator
# database=None: no example database kept; deadline=None: a 5000-digit number takes a while
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])
DECODE_WORLD = fm.World("subj01", (3, 4, 5), fm.SMALL_AFFINE, 1.5)  # runs for the mutator, without data


def answer(frames: list[bytes]) -> Message | None:
    """What the service does with `frames` before judging them: decode, and build the ack. Anything
    but a message or a ProtocolError, or an ack that cannot be sent, fails."""
    try:
        message = decode(frames)
    except ProtocolError as error:
        ack = decode(encode(Ack.rejecting(error, Stamper().envelope())))
        assert ack.acked_seq == error.seq and ack.reason == error.code
        return None
    version = json.loads(bytes(frames[0]))["protocol_version"]
    assert re.fullmatch(r"[0-9]+\.[0-9]+", version, re.ASCII) and int(version.split(".")[0]) == 1, version
    assert 0 <= message.envelope.seq < 2**63
    encode(Ack(message.envelope.seq, Verdict.ACCEPTED, None, "", Stamper().envelope()))
    assert type(decode(encode(message))) is type(message)  # what decodes, encodes
    return message


@settings(PROPERTY, max_examples=600)
@given(fm.frames())
def test_decode_answers_any_frames_with_a_message_or_a_protocol_error(frames):
    answer(frames)


@settings(PROPERTY, max_examples=40)
@given(st.integers(0, 2**32 - 1))
def test_decode_answers_every_message_of_the_seeded_mutator(seed):
    for frames in fm.random_messages(seed, 250, DECODE_WORLD, huge_every=10**9):
        answer(frames)


def _known_cases() -> dict[str, list[bytes]]:
    """The bug classes of issue 9 that decode sees, one message each."""
    rng = fm.random.Random(0)
    volume, payload = fm.template("volume", rng)
    cases = {}
    for type_ in fm.TYPES:
        header, frames = fm.template(type_, rng)
        for path in fm.field_paths(header):
            value = header
            for key in path:
                value = value[key]
            if isinstance(value, int | float) and not isinstance(value, bool):
                for number in (10**400, -10**400, 2**63, -1, math.nan):
                    hit = json.loads(json.dumps(header))
                    fm.set_path(hit, path, number)
                    cases[f"{type_} {'.'.join(map(str, path))}={str(number)[:6]}"] = [fm.dump(hit), *frames]
    broken = dict(volume, session="../x")
    for seq in (-1, -(2**63) - 1, 2**63, 10**400):
        cases[f"seq {str(seq)[:6]} in a malformed message"] = [fm.dump(dict(broken, seq=seq)), *payload]
    for n in (4, 64, 65, 70):
        cases[f"{n} frames"] = [fm.dump(volume), *[payload[0]] * (n - 1)]
    for version in fm.VERSIONS:
        cases[f"protocol_version {version[:12]!r}"] = [fm.dump(dict(volume, protocol_version=version)), *payload]
    for raw in fm.RAW:
        cases[f"raw {raw[:12]!r} as seq"] = [fm.dump(dict(volume, seq=fm._RAW_MARK), raw), *payload]
    return cases


KNOWN = _known_cases()


@pytest.mark.parametrize("name", KNOWN)
def test_known_hostile_messages_are_answered(name):
    answer(KNOWN[name])  # a version of non-ASCII digits too must be refused: `answer` checks what decodes


def test_the_mutator_writes_every_kind_type_and_frame_count_reproducibly():
    mutator = fm.Mutator(0, DECODE_WORLD, huge_every=50)
    items = [mutator.message() for _ in range(3000)]
    assert {item.kind for item in items} == {*fm.WEIGHTS, "huge"}
    decoded = {type(m).TYPE for m in map(_decoded, items) if m is not None}
    assert decoded == set(fm.TYPES)  # valid messages of every type come through too
    counts = {len(item.frames) for item in items}
    assert {1, 2, 3} <= counts and max(counts) >= 65
    assert max(len(frame) for item in items for frame in item.frames) >= 2 << 20
    first, again = list(fm.random_messages(7, 300, DECODE_WORLD)), list(fm.random_messages(7, 300, DECODE_WORLD))
    assert first == again


def _decoded(item: fm.Fuzz) -> Message | None:
    try:
        return decode(item.frames)
    except Exception:  # noqa: BLE001 - counted elsewhere; here only what decodes matters
        return None


# ---- the service end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_world, tmp_path_factory):
    return untrained_checkpoint(tiny_world[0], tmp_path_factory.mktemp("fuzz-checkpoint") / "checkpoint")


def fuzz_and_check(root, checkpoint, out_dir, *, messages: int, seconds: float) -> None:
    report = fm.fuzz_service(root, checkpoint, out_dir, messages=messages, seconds=seconds, seed=FUZZ_SEED,
                             skip=FUZZ_SKIP)
    text = report.format(MAX_RSS_GROWTH_MB)
    print(text)
    extra = []  # what only the test checks: the betas against the clean reference, and that the resend came
    if report.betas_file is None:
        extra.append("the clean run's betas were never saved")
    else:
        saved = np.load(report.betas_file)
        live, reference = dict(zip(saved["trial"].tolist(), saved["betas_nv"])), expected_betas(root, fm.RUN)
        if live.keys() != reference.keys() or not all(
                np.allclose(live[t], reference[t], rtol=1e-5, atol=1e-5) for t in reference):
            extra.append("the clean run's betas differ from the clean reference")
    if not report.resend_acks:
        extra.append("the clean run was not resent after it closed (the stream ended first)")
    problems = report.problems(MAX_RSS_GROWTH_MB) + extra
    assert not problems, "\n".join(extra) + "\n" + text


def test_the_service_survives_a_fuzz_stream_and_decodes_a_clean_run_once(tiny_world, checkpoint, tmp_path):
    fuzz_and_check(tiny_world[0], checkpoint, tmp_path, messages=FUZZ_MESSAGES, seconds=FUZZ_SECONDS)


@pytest.mark.slow
def test_a_million_fuzz_messages(tiny_world, checkpoint, tmp_path):
    fuzz_and_check(tiny_world[0], checkpoint, tmp_path, messages=1_000_000, seconds=math.inf)
