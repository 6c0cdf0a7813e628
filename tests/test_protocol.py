"""The wire protocol: round trips, every refusal and its reason code, loopback ZeroMQ exchanges,
CURVE admission, a client written without the library, and no pickle in the package."""
from __future__ import annotations

import ast
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

import mindeye.protocol
from mindeye.protocol import (MESSAGE_TYPES, PROTOCOL_VERSION, Ack, CurveClient, CurveServer, Envelope, Event, Events,
                              ProtocolError, Reason, Result, Retrieval, RunEnd, RunStart, Stamper, Verdict, Volume,
                              bound_endpoint, create_keypair, decode, encode, load_keypair, messages, recv,
                              recv_with_peer, result_publisher, result_subscriber, send, volume_receiver, volume_sender)
from mindeye.protocol.messages import BridgeTimes, Motion

SHAPE = (81, 104, 83)  # NSD subj01, 1.8 mm
AFFINE = ((1.8, 0.0, 0.0, -72.0), (0.0, 1.8, 0.0, -93.6), (0.0, 0.0, 1.8, -74.7), (0.0, 0.0, 0.0, 1.0))
TR = 4.0 / 3.0
LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_MS = 2000  # for messages that must arrive; the tests never wait this long when all is well


def _envelope(seq: int = 0) -> Envelope:
    return Envelope("a1b2c3d4", seq, 1.7e9 + seq)


def _volume(index: int = 0, dtype: str = "int16", shape: tuple[int, int, int] = SHAPE) -> Volume:
    values_xyz = np.random.default_rng(index).normal(0, 300, shape).astype(dtype)
    return Volume.from_array(values_xyz, session="subj01-nsd01", subject="subj01", run=1, index=index,
                             acq_time_s=index * TR, tr_s=TR, affine=AFFINE, envelope=_envelope(index))


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _result(trial: int = 3, with_images: bool = True) -> Result:
    return Result("subj01-nsd01", 1, trial, image_id=46002, volume_index=40, embedding_norm=12.5,
                  top_k=(Retrieval(46002, 0.61), Retrieval(102, 0.47), Retrieval(7, 0.47)),
                  timings_ms={"receive": 0.2, "glm": 3.1, "decode": 4.0, "generate": 80.5, "end_to_end": 95.0},
                  flags=("late",), envelope=_envelope(trial),
                  image_png=_png((200, 30, 30)) if with_images else None,
                  lowlevel_png=_png((90, 90, 90)) if with_images else None, image_is_candidate=True)


def _bridge_volume(index: int = 7) -> Volume:
    """A volume as mindeye-bridge sends it (1.3): with its motion and its times on the scanner side."""
    plain = _volume(index, "float32", (6, 5, 4))
    return Volume.from_array(plain.array(), session="subj01-nsd01", subject="subj01", run=1, index=index,
                             acq_time_s=index * TR, tr_s=TR, affine=AFFINE, envelope=_envelope(index),
                             motion=Motion((0.4, -0.1, 0.9, 0.003, -0.0007, 0.0012), 0.23),
                             bridge=BridgeTimes(1.7e9, 1.7e9 + 0.04, 1.7e9 + 0.14))


MESSAGES = {
    "volume": _volume(5),
    "volume_with_motion": _bridge_volume(),
    "volume_float64": _volume(6, "float64", (7, 5, 3)),
    "run_start": RunStart("subj01-nsd01", "subj01", 1, TR, 226, "int16", SHAPE, AFFINE, _envelope()),
    "run_start_unknown_length": RunStart("s", "subj01", 2, 2.0, None, "float32", (4, 4, 4), AFFINE, _envelope()),
    "run_end": RunEnd("subj01-nsd01", 1, 226, _envelope(300)),
    "events": Events("subj01-nsd01", 1, (Event(0, 12.0, 3.0, 46002, "image"), Event(1, 16.0, 3.0, None, "blank")),
                     complete=True, envelope=_envelope(1)),
    "result": _result(),
    "result_without_images": _result(with_images=False),
    "result_only_lowlevel": Result("s", 1, 0, None, 9, None, (), {}, ("skipped",), _envelope(), None, _png((1, 2, 3))),
    "ack": Ack(17, Verdict.ACCEPTED, None, "", _envelope(2)),
    "ack_rejected": Ack(None, Verdict.REJECTED, Reason.NOT_JSON, "frame 0 is not UTF-8 JSON", _envelope(3)),
}


@pytest.mark.parametrize("name", MESSAGES)
def test_every_message_type_round_trips(name):
    message = MESSAGES[name]
    decoded = decode(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)
    header = json.loads(encode(message)[0])
    assert header["type"] == message.TYPE and header["protocol_version"] == PROTOCOL_VERSION == "1.3"
    assert header["seq"] == message.envelope.seq


def test_volume_bytes_are_viewed_read_only_without_copy():
    volume = _volume(2)
    frames = encode(volume)
    frame_address = np.frombuffer(frames[1], np.uint8).__array_interface__["data"][0]
    view_xyz = decode(frames).array()
    assert view_xyz.__array_interface__["data"][0] == frame_address  # the very bytes that arrived
    assert view_xyz.shape == SHAPE and view_xyz.dtype == np.dtype("<i2")
    assert not view_xyz.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view_xyz[0, 0, 0] = 1
    writable_frame = bytearray(frames[1])  # a received zmq.Frame is writable too
    assert not decode([frames[0], writable_frame]).array().flags.writeable
    # C order: element (i, j, k) sits at byte ((i * Y + j) * Z + k) * itemsize
    i, j, k = 40, 17, 61
    offset = ((i * SHAPE[1] + j) * SHAPE[2] + k) * 2
    assert int.from_bytes(frames[1][offset:offset + 2], "little", signed=True) == view_xyz[i, j, k]


def test_volume_from_big_endian_array_travels_little_endian():
    values_xyz = np.arange(24, dtype=">f4").reshape(2, 3, 4) - 5.5
    volume = Volume.from_array(values_xyz, session="s", subject="x", run=1, index=0, acq_time_s=0.0, tr_s=1.0,
                               affine=np.eye(4), envelope=_envelope())
    assert volume.data == values_xyz.astype("<f4").tobytes()
    np.testing.assert_array_equal(decode(encode(volume)).array(), values_xyz)


def test_nan_samples_are_not_a_protocol_error():
    values_xyz = np.full((3, 3, 3), np.nan, dtype=np.float32)
    volume = Volume.from_array(values_xyz, session="s", subject="x", run=1, index=0, acq_time_s=0.0, tr_s=1.0,
                               affine=AFFINE, envelope=_envelope())
    assert np.isnan(decode(encode(volume)).array()).all()


def test_minor_versions_and_unknown_fields_are_accepted_major_versions_are_not():
    frames = encode(_volume(1))
    header = json.loads(frames[0])
    header.update(protocol_version="1.7", field_from_the_future={"x": 1})
    assert decode([json.dumps(header).encode(), frames[1]]) == _volume(1)
    header["protocol_version"] = "1.1"  # an older minor version
    assert decode([json.dumps(header).encode(), frames[1]]) == _volume(1)
    header["protocol_version"] = "2.0"
    with pytest.raises(ProtocolError, match="2.0") as error:
        decode([json.dumps(header).encode(), frames[1]])
    assert error.value.code == Reason.UNSUPPORTED_VERSION


def test_image_is_candidate_is_optional_and_a_boolean():
    frames = encode(_result(with_images=False))
    header = json.loads(frames[0])
    assert header["image_is_candidate"] is True and decode(frames).image_is_candidate is True
    del header["image_is_candidate"]  # a 1.1 (or early 1.2) service: unknown
    assert decode([json.dumps(header).encode()]).image_is_candidate is None
    for bad in (1, "yes"):
        header["image_is_candidate"] = bad
        with pytest.raises(ProtocolError, match="image_is_candidate") as error:
            decode([json.dumps(header).encode()])
        assert error.value.code == Reason.WRONG_TYPE


def _set(path, value):
    """A header edit: set `header[path[0]][path[1]]...` to value (delete when value is _DELETE)."""
    def edit(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


_DELETE = object()
_TRANSPOSED = [list(column) for column in zip(*AFFINE)]
_HUGE = 10**400  # a JSON integer of 401 digits: float() of it overflows
_EVENT = {"trial": 0, "onset_s": 1.0, "duration_s": 3.0, "image_id": None, "label": "blank"}

# (message, header edit, expected code, words the error must contain)
HEADER_CASES = {
    "missing_type": ("volume", _set(["type"], _DELETE), Reason.MISSING_FIELD, "'type'"),
    "unknown_type": ("volume", _set(["type"], "volumes"), Reason.UNKNOWN_TYPE, "'volumes'"),
    "type_not_string": ("volume", _set(["type"], 3), Reason.WRONG_TYPE, "'type' must be a string"),
    "bad_version_text": ("volume", _set(["protocol_version"], "one"), Reason.UNSUPPORTED_VERSION, "'one'"),
    "missing_version": ("volume", _set(["protocol_version"], _DELETE), Reason.MISSING_FIELD, "'protocol_version'"),
    "missing_tr": ("volume", _set(["tr_s"], _DELETE), Reason.MISSING_FIELD, "volume: field 'tr_s' is missing"),
    "run_as_string": ("volume", _set(["run"], "1"), Reason.WRONG_TYPE, "'run' must be an integer, got str"),
    "index_as_float": ("volume", _set(["index"], 3.0), Reason.WRONG_TYPE, "'index' must be an integer, got float"),
    "index_as_bool": ("volume", _set(["index"], True), Reason.WRONG_TYPE, "'index' must be an integer, got bool"),
    "negative_index": ("volume", _set(["index"], -1), Reason.BAD_VALUE, "'index' must be >= 0"),
    "run_zero": ("volume", _set(["run"], 0), Reason.BAD_VALUE, "'run' must be >= 1"),
    "nan_tr": ("volume", _set(["tr_s"], math.nan), Reason.BAD_VALUE, "'tr_s' must be finite"),
    "infinite_tr": ("run_start", _set(["tr_s"], math.inf), Reason.BAD_VALUE, "'tr_s' must be finite"),
    "zero_tr": ("volume", _set(["tr_s"], 0), Reason.BAD_VALUE, "'tr_s' must be >= 0.1"),
    "tiny_tr": ("run_start", _set(["tr_s"], 5e-324), Reason.BAD_VALUE, "'tr_s' must be >= 0.1"),  # hung the GLM
    "tr_as_string": ("volume", _set(["tr_s"], "1.33"), Reason.WRONG_TYPE, "'tr_s' must be a number"),
    "unsafe_session": ("volume", _set(["session"], "../etc"), Reason.BAD_VALUE, "'session' must match"),
    "missing_sender": ("volume", _set(["sender_id"], _DELETE), Reason.MISSING_FIELD, "'sender_id'"),
    "negative_seq": ("volume", _set(["seq"], -3), Reason.BAD_VALUE, "'seq' must be >= 0"),
    "seq_beyond_64_bits": ("volume", _set(["seq"], 2**64), Reason.BAD_VALUE, "fit in 64 bits"),
    "dtype_int32": ("volume", _set(["dtype"], "int32"), Reason.BAD_DTYPE, "'dtype' must be one of int16"),
    "dtype_missing": ("run_start", _set(["dtype"], _DELETE), Reason.MISSING_FIELD, "'dtype'"),
    "shape_2d": ("volume", _set(["shape"], [81, 104]), Reason.BAD_SHAPE, "'shape' must be 3 positive integers"),
    "shape_zero": ("volume", _set(["shape"], [81, 0, 83]), Reason.BAD_SHAPE, "'shape'"),
    "shape_float": ("run_start", _set(["shape"], [81, 104, 83.0]), Reason.BAD_SHAPE, "'shape'"),
    "affine_3x4": ("volume", _set(["affine"], [list(row) for row in AFFINE[:3]]), Reason.BAD_AFFINE, "4x4"),
    "affine_infinite": ("volume", _set(["affine", 0, 0], math.inf), Reason.BAD_AFFINE, "finite"),
    "affine_transposed": ("run_start", _set(["affine"], _TRANSPOSED), Reason.BAD_AFFINE, "last row must be"),
    "n_volumes_zero": ("run_start", _set(["n_volumes"], 0), Reason.BAD_VALUE, "'n_volumes' must be >= 1"),
    "event_onset_text": ("events", _set(["events", 1, "onset_s"], "16"), Reason.WRONG_TYPE,
                         "'events[1].onset_s' must be a number"),
    "event_missing_label": ("events", _set(["events", 0, "label"], _DELETE), Reason.MISSING_FIELD,
                            "'events[0].label'"),
    "event_not_object": ("events", _set(["events", 0], 12.0), Reason.WRONG_TYPE, "'events[0]' must be an object"),
    "event_repeated_trial": ("events", _set(["events", 1, "trial"], 0), Reason.BAD_VALUE, "trials [0]"),
    "events_complete_missing": ("events", _set(["complete"], _DELETE), Reason.MISSING_FIELD, "'complete'"),
    "negative_timing": ("result", _set(["timings_ms", "glm"], -1.0), Reason.BAD_VALUE, "'timings_ms.glm'"),
    "top_k_unsorted": ("result", _set(["top_k", 0, "score"], 0.1), Reason.BAD_VALUE, "best first"),
    "top_k_image_id_null": ("result", _set(["top_k", 2, "image_id"], None), Reason.WRONG_TYPE,
                            "'top_k[2].image_id' must be an integer"),
    "flag_not_string": ("result", _set(["flags", 0], 1), Reason.WRONG_TYPE, "'flags[0]' must be a string"),
    "frames_unknown_name": ("result", _set(["frames"], ["image_png", "depth_png"]), Reason.BAD_VALUE, "'frames'"),
    "frames_undeclared": ("result", _set(["frames"], ["image_png"]), Reason.FRAME_COUNT, "1 + 2"),
    "ack_unknown_verdict": ("ack", _set(["verdict"], "maybe"), Reason.BAD_VALUE, "'verdict'"),
    "ack_rejected_without_reason": ("ack", _set(["verdict"], "rejected"), Reason.BAD_VALUE, "'reason' must be"),
    # integers too large for a float, in every kind of numeric field
    "tr_huge_integer": ("volume", _set(["tr_s"], _HUGE), Reason.BAD_VALUE, "'tr_s' must be finite"),
    "acq_time_huge_integer": ("volume", _set(["acq_time_s"], -_HUGE), Reason.BAD_VALUE, "'acq_time_s' must be finite"),
    "sent_unix_s_huge_integer": ("run_end", _set(["sent_unix_s"], _HUGE), Reason.BAD_VALUE, "'sent_unix_s'"),
    "affine_huge_integer": ("volume", _set(["affine", 0, 3], _HUGE), Reason.BAD_AFFINE, "finite"),
    "onset_huge_integer": ("events", _set(["events", 0, "onset_s"], _HUGE), Reason.BAD_VALUE, "'events[0].onset_s'"),
    "score_huge_integer": ("result", _set(["top_k", 0, "score"], _HUGE), Reason.BAD_VALUE, "'top_k[0].score'"),
    # protocol_version: ASCII digits only, and few of them
    "version_fullwidth_digits": ("volume", _set(["protocol_version"], "\uff11.\uff11"), Reason.UNSUPPORTED_VERSION,
                                 "not supported"),
    "version_arabic_indic_digits": ("volume", _set(["protocol_version"], "\u0661.\u0661"),
                                    Reason.UNSUPPORTED_VERSION, "not supported"),
    "version_of_4000_digits": ("volume", _set(["protocol_version"], "0" * 4000 + "1.1"), Reason.UNSUPPORTED_VERSION,
                               "not supported"),
    "version_of_5000_digits": ("volume", _set(["protocol_version"], "0" * 5000 + "1.1"), Reason.BAD_VALUE,
                               "'protocol_version' must be at most 4096 characters"),
    # the limits (docs/protocol.md, "Limits")
    "tr_above_60_s": ("volume", _set(["tr_s"], 60.5), Reason.BAD_VALUE, "'tr_s' must be >= 0.1 and <= 60.0"),
    "index_at_max_run_volumes": ("volume", _set(["index"], 10_000), Reason.BAD_VALUE,
                                 "'index' must be >= 0 and <= 9999"),
    "index_of_10_to_18": ("volume", _set(["index"], 10**18), Reason.BAD_VALUE, "'index'"),
    "run_above_9999": ("volume", _set(["run"], 10_000), Reason.BAD_VALUE, "'run' must be >= 1 and <= 9999"),
    "run_start_n_volumes_too_many": ("run_start", _set(["n_volumes"], 10_001), Reason.BAD_VALUE, "'n_volumes'"),
    "run_end_n_volumes_too_many": ("run_end", _set(["n_volumes"], 10**18), Reason.BAD_VALUE,
                                   "'n_volumes' must be >= 0 and <= 10000"),
    "acq_time_negative": ("volume", _set(["acq_time_s"], -1.0), Reason.BAD_VALUE, "'acq_time_s' must be >= 0.0"),
    "acq_time_over_a_day": ("volume", _set(["acq_time_s"], 86_400.5), Reason.BAD_VALUE, "<= 86400.0"),
    "onset_over_a_day": ("events", _set(["events", 1, "onset_s"], 1e9), Reason.BAD_VALUE, "'events[1].onset_s'"),
    "duration_over_a_day": ("events", _set(["events", 1, "duration_s"], 1e9), Reason.BAD_VALUE,
                            "'events[1].duration_s'"),
    "duration_over_10_minutes": ("events", _set(["events", 1, "duration_s"], 601), Reason.BAD_VALUE,
                                 "'events[1].duration_s' must be >= 0.0 and <= 600.0"),
    "trial_at_max_trials": ("events", _set(["events", 1, "trial"], 10_000), Reason.BAD_VALUE, "'events[1].trial'"),
    "image_id_beyond_31_bits": ("events", _set(["events", 0, "image_id"], 2**31), Reason.BAD_VALUE,
                                "'events[0].image_id'"),
    "label_too_long": ("events", _set(["events", 0, "label"], "x" * 4097), Reason.BAD_VALUE,
                       "'events[0].label' must be at most 4096 characters, got 4097"),
    "too_many_events": ("events", _set(["events"], [dict(_EVENT, trial=i) for i in range(10_001)]), Reason.BAD_VALUE,
                        "10001 trials, the limit is 10000"),
    "sent_unix_s_far_future": ("run_end", _set(["sent_unix_s"], 1e12), Reason.BAD_VALUE, "'sent_unix_s'"),
    "shape_dimension_too_large": ("volume", _set(["shape"], [4097, 1, 1]), Reason.BAD_SHAPE, "'shape'"),
    "shape_too_many_voxels": ("run_start", _set(["shape"], [256, 256, 257]), Reason.BAD_SHAPE, "16777216 voxels"),
    "affine_beyond_100_m": ("volume", _set(["affine", 1, 3], -2e5), Reason.BAD_AFFINE, "100000"),
    "result_trial_at_max_trials": ("result", _set(["trial"], 10_000), Reason.BAD_VALUE, "'trial'"),
    "result_volume_index_too_large": ("result", _set(["volume_index"], 10_000), Reason.BAD_VALUE, "'volume_index'"),
    "top_k_image_id_beyond_31_bits": ("result", _set(["top_k", 1, "image_id"], 2**31), Reason.BAD_VALUE,
                                      "'top_k[1].image_id'"),
    "flag_too_long": ("result", _set(["flags", 0], "x" * 5000), Reason.BAD_VALUE, "'flags[0]' must be at most 4096"),
    "ack_detail_too_long": ("ack", _set(["detail"], "x" * 4097), Reason.BAD_VALUE, "'detail' must be at most 4096"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_is_refused_with_its_reason(case):
    name, edit, code, words = HEADER_CASES[case]
    frames = encode(MESSAGES[name])
    header = json.loads(frames[0])
    edit(header)
    with pytest.raises(ProtocolError) as error:
        decode([json.dumps(header).encode(), *frames[1:]])
    assert error.value.code == code
    assert words in str(error.value)
    seq = header.get("seq")
    if isinstance(seq, int) and 0 <= seq < 2**63:
        assert error.value.seq == seq  # so a receiver can say which message it refused
    else:
        assert error.value.seq is None  # not a seq an ack could carry
    encode(Ack.rejecting(error.value, _envelope()))  # the refusal itself is a valid message


VOLUME_FRAMES = encode(_volume(4))
RESULT_FRAMES = encode(_result())
# (frames, expected code, words the error must contain)
FRAME_CASES = {
    "no_frames": ([], Reason.FRAME_COUNT, "no frames"),
    "not_utf8": ([b"\xff\xfe{}", VOLUME_FRAMES[1]], Reason.NOT_JSON, "UTF-8"),
    "not_json": ([b"{'type': 'volume'}", VOLUME_FRAMES[1]], Reason.NOT_JSON, "not UTF-8 JSON"),
    "json_list": ([b"[1, 2]", VOLUME_FRAMES[1]], Reason.NOT_OBJECT, "got list"),
    "volume_without_data": (VOLUME_FRAMES[:1], Reason.FRAME_COUNT, "1 + 0"),
    "volume_extra_frame": ([*VOLUME_FRAMES, b"x"], Reason.FRAME_COUNT, "1 + 2"),
    "volume_truncated": ([VOLUME_FRAMES[0], VOLUME_FRAMES[1][:-2]], Reason.FRAME_SIZE, "truncated"),
    "volume_oversized": ([VOLUME_FRAMES[0], VOLUME_FRAMES[1] + b"\0" * 8], Reason.FRAME_SIZE, "oversized"),
    "run_end_with_payload": ([encode(MESSAGES["run_end"])[0], b"x"], Reason.FRAME_COUNT, "1 + 1"),
    "result_missing_image": (RESULT_FRAMES[:2], Reason.FRAME_COUNT, "1 + 1"),
    "result_not_png": ([RESULT_FRAMES[0], b"GIF89a...", RESULT_FRAMES[2]], Reason.BAD_PNG, "frame 1 ('image_png')"),
    "integer_of_5000_digits": ([VOLUME_FRAMES[0].replace(b'"index":4', b'"index":' + b"4" * 5000), VOLUME_FRAMES[1]],
                               Reason.NOT_JSON, "digits"),
    "too_many_frames_before_json": ([b"not json", *[b""] * 4], Reason.FRAME_COUNT, "5 frames, the limit is 3"),
}


@pytest.mark.parametrize("case", FRAME_CASES)
def test_malformed_frames_are_refused_with_their_reason(case):
    frames, code, words = FRAME_CASES[case]
    with pytest.raises(ProtocolError) as error:
        decode(frames)
    assert error.value.code == code
    assert words in str(error.value)
    encode(Ack.rejecting(error.value, _envelope()))


def test_frame_sizes_are_checked_before_the_header_is_parsed():
    padded = VOLUME_FRAMES[0] + b" " * messages.MAX_HEADER_BYTES  # valid JSON, but over the limit
    with pytest.raises(ProtocolError) as error:
        decode([padded, VOLUME_FRAMES[1]])
    assert error.value.code == Reason.FRAME_SIZE
    assert f"header frame of {len(padded)} bytes, the limit is {messages.MAX_HEADER_BYTES}" in str(error.value)
    exactly = VOLUME_FRAMES[0] + b" " * (messages.MAX_HEADER_BYTES - len(VOLUME_FRAMES[0]))
    assert decode([exactly, VOLUME_FRAMES[1]]) == decode(VOLUME_FRAMES)
    huge_frame = np.zeros(messages.MAX_FRAME_BYTES + 1, np.uint8)  # calloc'd: no memory is touched
    for frames in ([b"not json", huge_frame], [RESULT_FRAMES[0], RESULT_FRAMES[1], huge_frame]):
        with pytest.raises(ProtocolError) as error:
            decode(frames)
        assert error.value.code == Reason.FRAME_SIZE and f"{messages.MAX_FRAME_BYTES + 1} bytes" in str(error.value)


def test_motion_and_bridge_times_are_optional_and_checked():
    frames = encode(_bridge_volume())
    header = json.loads(frames[0])
    assert header["motion"] == {"trans_x_mm": 0.4, "trans_y_mm": -0.1, "trans_z_mm": 0.9, "rot_x_rad": 0.003,
                                "rot_y_rad": -0.0007, "rot_z_rad": 0.0012, "fd_mm": 0.23}
    assert header["bridge"] == {"seen": 1.7e9, "read": 1.7e9 + 0.04, "registered": 1.7e9 + 0.14}
    assert "motion" not in json.loads(encode(_volume(1))[0])  # absent, so a 1.2 volume's header is unchanged

    def decoded(change) -> Volume:
        edited = json.loads(frames[0])
        change(edited)
        return decode([json.dumps(edited).encode(), frames[1]])

    old_sender = decoded(lambda h: (h.pop("motion"), h.pop("bridge"), h.update(protocol_version="1.2")))
    assert old_sender.motion is None and old_sender.bridge is None
    assert decoded(lambda h: h.update(motion=None, bridge=None)).motion is None
    refusals = {  # edit -> (reason, text the error must hold)
        "motion as a list": (lambda h: h.update(motion=[0.0] * 7), Reason.WRONG_TYPE, "'motion' must be an object"),
        "a parameter missing": (lambda h: h["motion"].pop("rot_z_rad"), Reason.MISSING_FIELD, "'motion.rot_z_rad'"),
        "translation past the bore": (lambda h: h["motion"].update(trans_y_mm=501), Reason.BAD_VALUE,
                                      "'motion.trans_y_mm' must be >= -500.0 and <= 500.0"),
        "rotation past pi": (lambda h: h["motion"].update(rot_x_rad=3.2), Reason.BAD_VALUE, "'motion.rot_x_rad'"),
        "negative displacement": (lambda h: h["motion"].update(fd_mm=-0.1), Reason.BAD_VALUE, "'motion.fd_mm'"),
        "a time as text": (lambda h: h["bridge"].update(read="now"), Reason.WRONG_TYPE, "'bridge.read'"),
        "a clock in ms": (lambda h: h["bridge"].update(seen=1.7e12), Reason.BAD_VALUE, "'bridge.seen'"),
        "read before seen": (lambda h: h["bridge"].update(read=1.7e9 - 1), Reason.BAD_VALUE,
                             "'bridge' must hold non-decreasing times seen, read, registered"),
    }
    for name, (change, reason, text) in refusals.items():
        with pytest.raises(ProtocolError, match=re.escape(text)) as error:
            decoded(change)
        assert error.value.code == reason, name


def test_the_limits_have_the_documented_values():
    assert (messages.MAX_FRAMES, messages.MAX_HEADER_BYTES, messages.MAX_FRAME_BYTES) == (3, 1 << 20, 128 << 20)
    assert (messages.MAX_VOXELS, messages.MAX_RUN_VOLUMES, messages.MAX_TRIALS, messages.MAX_RUN) == (
        1 << 24, 10_000, 10_000, 9_999)
    assert (messages.MAX_TIME_S, messages.MAX_DURATION_S, messages.MIN_TR_S, messages.MAX_ABS_MM) == (
        86_400.0, 600.0, 0.1, 1e5)
    # the largest volume allowed fits one payload frame
    assert messages.MAX_VOXELS * 8 <= messages.MAX_FRAME_BYTES
    assert Reason.LIMIT == "limit" and PROTOCOL_VERSION == "1.3"
    limits = Path(mindeye.protocol.__file__).parents[2].joinpath("docs", "protocol.md").read_text()
    limits = limits.split("## Limits", 1)[1].split("\n## ", 1)[0]
    for name in ("MAX_FRAMES", "MAX_HEADER_BYTES", "MAX_FRAME_BYTES", "MAX_VOXELS", "MAX_RUN_VOLUMES", "MAX_TRIALS",
                 "MAX_RUN", "MAX_TIME_S", "MAX_DURATION_S", "MIN_TR_S", "MAX_ABS_MM", "MAX_MOTION_MM", "MAX_FD_MM",
                 "max_open_runs",
                 "max_silence_s", "max_closed_runs", "max_waiting_runs", "max_senders"):
        assert f"`{name}`" in limits, name


def _number_paths(value, path=()):
    """The path of every number in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _number_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _number_paths(item, (*path, i))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path


HOSTILE_NUMBERS = (10**400, -10**400, 10**4000, 2**63, 2**64, -1, -2**63 - 1, 1e308, -0.0, math.inf, -math.inf,
                   math.nan)


@pytest.mark.parametrize("name", MESSAGES)
def test_no_number_in_any_field_breaks_decode_or_the_rejecting_ack(name):
    frames = encode(MESSAGES[name])
    for path in _number_paths(json.loads(frames[0])):
        for value in HOSTILE_NUMBERS:
            header = json.loads(frames[0])
            _set(list(path), value)(header)
            try:
                decode([json.dumps(header).encode(), *frames[1:]])
            except ProtocolError as error:
                encode(Ack.rejecting(error, _envelope()))


def test_truncated_volume_error_gives_both_sizes():
    with pytest.raises(ProtocolError) as error:
        decode([VOLUME_FRAMES[0], VOLUME_FRAMES[1][:1000]])
    n_expected = math.prod(SHAPE) * 2
    assert f"1000 bytes, expected {n_expected} (81x104x83 int16)" in str(error.value)


@pytest.mark.parametrize("message, code", [
    (RunStart("s", "x", 1, 2.0, None, "int16", (4, 0, 4), AFFINE, _envelope()), Reason.BAD_SHAPE),
    (Volume("s", "x", 1, 0, 0.0, 2.0, "int16", (2, 2, 2), AFFINE, b"\0" * 15, _envelope()), Reason.FRAME_SIZE),
    (RunEnd("s", 1, 10, Envelope("has space", 0, 0.0)), Reason.BAD_VALUE),
    (Events("s", 1, (Event(0, math.nan, 3.0, None, "x"),), True, _envelope()), Reason.BAD_VALUE),
    (Result("s", 1, 0, None, 0, 1.0, (), {}, (), _envelope(), image_png=b"not a png"), Reason.BAD_PNG),
    (RunStart("s", "x", 1, 10**400, None, "int16", (4, 4, 4), AFFINE, _envelope()), Reason.BAD_VALUE),
    (RunEnd("s", 1, 10**5000, _envelope()), Reason.BAD_VALUE),  # past Python's int-to-text digit limit
    (Events("s", 1, (Event(0, 1.0, 3.0, None, "x" * 5000),), True, _envelope()), Reason.BAD_VALUE),
])
def test_encode_refuses_what_decode_would_refuse(message, code):
    with pytest.raises(ProtocolError) as error:
        encode(message)
    assert error.value.code == code


def test_from_array_refuses_unsupported_arrays():
    common = dict(session="s", subject="x", run=1, index=0, acq_time_s=0.0, tr_s=1.0, affine=AFFINE,
                  envelope=_envelope())
    with pytest.raises(ProtocolError, match="int16, uint16, float32, float64, got int32") as error:
        Volume.from_array(np.zeros((2, 2, 2), np.int32), **common)
    assert error.value.code == Reason.BAD_DTYPE
    with pytest.raises(ProtocolError, match=r"3-D \(X, Y, Z\), got shape \(2, 2, 2, 5\)"):
        Volume.from_array(np.zeros((2, 2, 2, 5), np.int16), **common)


def test_stamper_counts_messages_and_a_restart_draws_a_new_id():
    first = Stamper()
    envelopes = [first.envelope() for _ in range(3)]
    assert [e.seq for e in envelopes] == [0, 1, 2]
    assert len({e.sender_id for e in envelopes}) == 1
    restarted = Stamper()
    assert restarted.envelope().seq == 0 and restarted.sender_id != first.sender_id


def test_the_examples_in_the_specification_decode():
    spec = Path(mindeye.protocol.__file__).parents[2] / "docs" / "protocol.md"
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", spec.read_text(), re.DOTALL)]
    assert {e["type"] for e in examples} == set(MESSAGE_TYPES)
    assert any("motion" in e and "bridge" in e for e in examples)  # 1.3's volume fields are shown
    for header in examples:
        assert header["protocol_version"] == PROTOCOL_VERSION
        itemsize = np.dtype(header.get("dtype", "int16")).itemsize
        payload = {"volume": [bytes(math.prod(header.get("shape", [])) * itemsize)],
                   "result": [_png((0, 0, 0)) for _ in header.get("frames", [])]}.get(header["type"], [])
        message = decode([json.dumps(header).encode(), *payload])
        assert message.TYPE == header["type"] and message.envelope.seq == header["seq"]


# ---- over real sockets ------------------------------------------------------------------------------

@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _subscribe_and_warm_up(publisher, subscriber, stamper):
    """Publish a warm-up result until the subscriber gets one: a SUB misses what precedes its subscription."""
    for _ in range(100):
        send(publisher, Result("warmup", 1, 0, None, 0, None, (), {}, (), stamper.envelope()))
        if subscriber.poll(50):
            return
    raise AssertionError("the subscriber never received the warm-up result")


def test_loopback_run_of_50_volumes_with_acks_and_a_published_result(context):
    receiver = volume_receiver(context, LOOPBACK)
    sender = volume_sender(context, bound_endpoint(receiver))
    scanner, service = Stamper(), Stamper()
    shape = SHAPE
    volumes_txyz = np.random.default_rng(0).integers(-2000, 2000, (50, *shape), dtype=np.int16)

    send(sender, RunStart("subj01-nsd01", "subj01", 1, TR, 50, "int16", shape, AFFINE, scanner.envelope()))
    for index, volume_xyz in enumerate(volumes_txyz):
        send(sender, Volume.from_array(volume_xyz, session="subj01-nsd01", subject="subj01", run=1, index=index,
                                       acq_time_s=index * TR, tr_s=TR, affine=AFFINE, envelope=scanner.envelope()))
    send(sender, RunEnd("subj01-nsd01", 1, 50, scanner.envelope()))

    received = []
    for _ in range(52):
        peer, message = recv_with_peer(receiver, TIMEOUT_MS)
        received.append(message)
        send(receiver, Ack(message.envelope.seq, Verdict.ACCEPTED, None, "", service.envelope()), peer=peer)
    assert recv_with_peer(receiver, 0) is None

    assert [type(m) for m in received] == [RunStart, *[Volume] * 50, RunEnd]
    assert [m.envelope.seq for m in received] == list(range(52))
    assert {m.envelope.sender_id for m in received} == {scanner.sender_id}
    volumes = received[1:51]
    assert [v.index for v in volumes] == list(range(50))
    for volume, expected_xyz in zip(volumes, volumes_txyz):
        np.testing.assert_array_equal(volume.array(), expected_xyz)
    assert isinstance(volumes[0].data, memoryview) and not volumes[0].array().flags.writeable
    assert volumes[9].acq_time_s == pytest.approx(9 * TR) and volumes[9].affine == AFFINE
    assert received[-1].n_volumes == 50

    acks = [recv(sender, TIMEOUT_MS) for _ in range(52)]
    assert [a.acked_seq for a in acks] == list(range(52))
    assert {a.verdict for a in acks} == {Verdict.ACCEPTED}
    assert {a.envelope.sender_id for a in acks} == {service.sender_id}

    publisher = result_publisher(context, LOOPBACK)
    subscriber = result_subscriber(context, bound_endpoint(publisher))
    _subscribe_and_warm_up(publisher, subscriber, service)
    published = [_result(trial) for trial in (0, 1, 2)]
    for result in published:
        send(publisher, result)
    got = []
    while len(got) < 3:
        message = recv(subscriber, TIMEOUT_MS)
        if message.session != "warmup":
            got.append(message)
    assert got == published
    assert bytes(got[1].image_png) == _png((200, 30, 30))
    assert Image.open(io.BytesIO(bytes(got[1].lowlevel_png))).getpixel((5, 5)) == (90, 90, 90)


def test_hand_built_message_without_the_library_is_accepted(context):
    """What a client in any language does: json + raw little-endian bytes, two frames, a DEALER."""
    receiver = volume_receiver(context, LOOPBACK)
    client = context.socket(zmq.DEALER)
    client.linger = 0
    client.connect(bound_endpoint(receiver))
    values_xyz = np.arange(4 * 5 * 6, dtype="<f4").reshape(4, 5, 6) / 7
    header = {"protocol_version": "1.0", "type": "volume", "sender_id": "matlab-7", "seq": 0,
              "sent_unix_s": 1700000000.25, "session": "pilot", "subject": "sub-01", "run": 2, "index": 11,
              "acq_time_s": 22.0, "tr_s": 2, "dtype": "float32", "shape": [4, 5, 6],
              "affine": [[2, 0, 0, -4], [0, 2, 0, -5], [0, 0, 2, -6], [0, 0, 0, 1]]}
    client.send_multipart([json.dumps(header).encode("utf-8"), values_xyz.tobytes()])

    peer, volume = recv_with_peer(receiver, TIMEOUT_MS)
    assert isinstance(volume, Volume) and (volume.session, volume.run, volume.index) == ("pilot", 2, 11)
    assert volume.tr_s == 2.0 and volume.affine[0] == (2.0, 0.0, 0.0, -4.0)
    np.testing.assert_array_equal(volume.array(), values_xyz)

    send(receiver, Ack(volume.envelope.seq, Verdict.ACCEPTED, None, "", _envelope()), peer=peer)
    assert client.poll(TIMEOUT_MS)
    ack_frames = client.recv_multipart()
    assert len(ack_frames) == 1
    ack = json.loads(ack_frames[0])  # and the answer reads back with json alone
    assert (ack["type"], ack["acked_seq"], ack["verdict"]) == ("ack", 0, "accepted")


def test_malformed_message_over_a_router_names_its_peer_for_a_rejecting_ack(context):
    receiver = volume_receiver(context, LOOPBACK)
    sender = volume_sender(context, bound_endpoint(receiver))
    header = json.loads(VOLUME_FRAMES[0])
    header["seq"] = 41
    sender.send_multipart([json.dumps(header).encode(), VOLUME_FRAMES[1][:-1]])
    with pytest.raises(ProtocolError) as error:
        recv_with_peer(receiver, TIMEOUT_MS)
    assert error.value.code == Reason.FRAME_SIZE and error.value.seq == 41 and error.value.peer
    send(receiver, Ack.rejecting(error.value, _envelope()), peer=error.value.peer)
    ack = recv(sender, TIMEOUT_MS)
    assert (ack.acked_seq, ack.verdict, ack.reason) == (41, Verdict.REJECTED, "frame_size")
    assert "truncated" in ack.detail


def test_router_needs_a_peer_and_recv_with_peer(context):
    receiver = volume_receiver(context, LOOPBACK)
    with pytest.raises(ValueError, match="peer"):
        send(receiver, MESSAGES["ack"])
    with pytest.raises(ValueError, match="recv_with_peer"):
        recv(receiver, 0)


# ---- CURVE ------------------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    """Key pairs for the GPU host, an allowed scanner and an unknown host; the GPU host admits the scanner."""
    paths = {name: create_keypair(tmp_path / name, name) for name in ("gpu", "scanner", "intruder")}
    allowed = tmp_path / "gpu_allowed_clients"
    allowed.mkdir()
    (allowed / "scanner.key").write_bytes(paths["scanner"][0].read_bytes())
    return paths, allowed


@pytest.fixture
def curve_receiver(keys):
    paths, allowed = keys
    context = zmq.Context()
    server = CurveServer(context, paths["gpu"][1], allowed)
    receiver = volume_receiver(context, LOOPBACK, curve=server)
    yield receiver
    receiver.close()
    server.stop()
    context.destroy(linger=0)


def test_curve_admits_an_allowed_client(context, keys, curve_receiver):
    paths, _ = keys
    client = CurveClient(secret_key_file=paths["scanner"][1], server_public_key_file=paths["gpu"][0])
    sender = volume_sender(context, bound_endpoint(curve_receiver), curve=client)
    send(sender, MESSAGES["volume"])
    _, volume = recv_with_peer(curve_receiver, TIMEOUT_MS)
    assert volume == MESSAGES["volume"]


def test_curve_settings_are_both_keys_or_neither():
    assert CurveClient.from_settings(None, None) is None
    assert CurveClient.from_settings("a.key_secret", "b.key") == CurveClient(Path("a.key_secret"), Path("b.key"))
    with pytest.raises(ValueError, match="CURVE needs both curve.secret_key_file and curve.server_public_key_file"):
        CurveClient.from_settings("a.key_secret", None)


@pytest.mark.parametrize("intruder", ["unknown_key", "no_curve"])
def test_curve_refuses_other_clients(context, keys, curve_receiver, intruder):
    paths, _ = keys
    curve = (CurveClient(secret_key_file=paths["intruder"][1], server_public_key_file=paths["gpu"][0])
             if intruder == "unknown_key" else None)
    sender = volume_sender(context, bound_endpoint(curve_receiver), curve=curve)
    send(sender, MESSAGES["volume"])
    assert recv_with_peer(curve_receiver, 1000) is None
    sender.close(linger=0)  # its undeliverable volume would otherwise hold the context for the sender's linger


def test_key_files_are_checked(context, tmp_path, keys):
    paths, _ = keys
    public, secret = load_keypair(paths["scanner"][1])
    assert len(public) == len(secret) == 40  # Z85 of 32-byte Curve25519 keys
    with pytest.raises(ValueError, match="no secret key"):
        load_keypair(paths["scanner"][0])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no client public keys"):
        CurveServer(context, paths["gpu"][1], empty)


# ---- never pickle -----------------------------------------------------------------------------------

def test_no_pickle_in_the_protocol_package():
    forbidden_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
    forbidden_attributes = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}
    package = Path(mindeye.protocol.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "messages.py", "transport.py"}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            where = f"{source.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {alias.name.split(".")[0] for alias in node.names}
                names |= {node.module.split(".")[0]} if isinstance(node, ast.ImportFrom) and node.module else set()
                assert not names & forbidden_modules, f"{where} imports {names & forbidden_modules}"
            is_forbidden_call = isinstance(node, ast.Attribute) and node.attr in forbidden_attributes
            assert not is_forbidden_call, f"{where} uses {node.attr}"
            assert not (isinstance(node, ast.keyword) and node.arg == "allow_pickle"), f"{where} allows pickle"
