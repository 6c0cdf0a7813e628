"""The session journal: byte-exact round trips, torn tails at every byte, corruption in the middle,
recovery after a crash, the fsync policies, and no pickle."""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zmq

import mindeye.journal
from mindeye.errors import FormatError
from mindeye.journal import JournalCorruptError, JournalWriter, TornTailWarning, check_journal, read_journal
from mindeye.protocol import Envelope, Event, Events, ProtocolError, RunEnd, RunStart, Volume, decode, encode

SHAPE = (81, 104, 83)  # NSD subj01, 1.8 mm: 1,398,384 bytes a volume
AFFINE = ((1.8, 0.0, 0.0, -72.0), (0.0, 1.8, 0.0, -93.6), (0.0, 0.0, 1.8, -74.7), (0.0, 0.0, 0.0, 1.0))
TR = 4.0 / 3.0
T0 = 1.7e9


def _visit(n_volumes: int, shape=SHAPE) -> list:
    """The messages of one short run: run_start, events, volumes, run_end."""
    envelope = lambda seq: Envelope("3f9c2a71d04be518", seq, T0 + seq)  # noqa: E731
    rng = np.random.default_rng(0)
    messages = [RunStart("subj01-nsd01", "subj01", 1, TR, n_volumes, "int16", shape, AFFINE, envelope(0)),
                Events("subj01-nsd01", 1, (Event(0, 12.0, 3.0, 46002, "image"), Event(1, 16.0, 3.0, None, "blank")),
                       True, envelope(1))]
    messages += [Volume.from_array(rng.integers(-2000, 2000, shape, dtype=np.int16), session="subj01-nsd01",
                                   subject="subj01", run=1, index=i, acq_time_s=i * TR, tr_s=TR, affine=AFFINE,
                                   envelope=envelope(2 + i)) for i in range(n_volumes)]
    return messages + [RunEnd("subj01-nsd01", 1, n_volumes, envelope(2 + n_volumes))]


def _write(path: Path, frame_lists: list[list[bytes]], **writer_options) -> list[int]:
    with JournalWriter(path, **writer_options) as writer:
        return [writer.append(frames, T0 + 0.5 * i) for i, frames in enumerate(frame_lists)]


def _small_journal(path: Path) -> tuple[list[list[bytes]], list[int]]:
    """Three small records; returns their frames and the byte offset of each record."""
    frame_lists = [[bytes(f) for f in encode(m)] for m in _visit(1, shape=(2, 3, 2))[1:]]
    _write(path, frame_lists)
    return frame_lists, [record.offset for record in read_journal(path)]


def test_a_recorded_visit_reads_back_byte_for_byte(tmp_path):
    messages = _visit(12)
    frame_lists = [encode(m) for m in messages]
    malformed = [b'{"protocol_version": "1.0", "type": "volume"', b"\x00" * 10]  # journaled as received
    path = tmp_path / "visit.mej"
    with JournalWriter(path) as writer:
        for i, frames in enumerate(frame_lists):
            as_received = [zmq.Frame(bytes(f)) for f in frames] if i == 3 else frames  # what a ROUTER hands over
            assert writer.append(as_received, T0 + 1.25 * i) == i
        assert writer.append(malformed, T0 + 100.0) == len(messages)

    records = list(read_journal(path))
    assert [r.index for r in records] == list(range(len(messages) + 1))
    assert [r.received_unix_s for r in records] == [T0 + 1.25 * i for i in range(len(messages))] + [T0 + 100.0]
    for record, frames, message in zip(records, frame_lists, messages):
        assert record.frames == tuple(bytes(f) for f in frames)
        assert record.message() == message
    assert records[4].message().array().shape == SHAPE and len(records[4].frames[1]) == 1_398_384
    assert records[-1].frames == tuple(malformed)
    offsets = [r.offset for r in records]
    assert offsets[0] == len(mindeye.journal.MAGIC) + 4 and offsets == sorted(offsets)

    report = check_journal(path)
    assert (report.n_records, report.intact_bytes, report.torn_tail) == (len(records), path.stat().st_size, None)


def test_a_malformed_message_is_journaled_as_a_bounded_note(tmp_path):
    """What a refused message was, in a record of its own size, whatever the message's size."""
    volume_frames = encode(_visit(1, shape=(2, 3, 2))[2])
    header = bytes(volume_frames[0]).replace(b'"index":0', b'"index":-1')
    huge = [header + b" " * (10 << 20), np.zeros(5 << 20, np.uint8), b"x", b"y"]  # 15 MB over four frames
    many = [b"\xff\xfe not json"] + [b"z"] * 99
    path = tmp_path / "refused.mej"
    with JournalWriter(path) as writer:
        writer.append(volume_frames, T0)
        assert writer.append_refused(huge, T0 + 1.0, "frame_size", "header frame of 10485760 bytes") == 1
        writer.append_refused(many, T0 + 2.0, "frame_count", "d" * 10_000, n_frames=250)

    accepted, first, second = read_journal(path)
    assert second.offset - first.offset < 2048 and path.stat().st_size - second.offset < 2048
    assert accepted.refusal is None and accepted.message() == decode(volume_frames)
    assert len(first.frames) == 1 and len(first.frames[0]) < 2048 and first.received_unix_s == T0 + 1.0
    assert first.refusal == {"journal_refused": 1, "reason": "frame_size", "detail": "header frame of 10485760 bytes",
                             "n_frames": 4, "frame_bytes": [len(huge[0]), 5 << 20, 1, 1],
                             "header_prefix": header[:256].decode("latin-1")}
    assert second.refusal["n_frames"] == 250 and second.refusal["frame_bytes"] == [len(many[0])] + [1] * 7
    assert second.refusal["detail"] == "d" * 500
    assert second.refusal["header_prefix"].encode("latin-1") == many[0]  # the bytes, undecoded: latin-1
    for record in (first, second):
        with pytest.raises(ProtocolError):  # a replay never executes a note
            record.message()


def test_a_received_message_that_looks_like_a_note_is_not_one(tmp_path):
    path = tmp_path / "j.mej"
    lookalike = json.dumps({"journal_refused": 1, "protocol_version": "1.2", "type": "ack"}).encode()
    _write(path, [[lookalike], [b'{"journal_refused": 1'], [b"{}", b"x"]])
    assert [record.refusal for record in read_journal(path)] == [None, None, None]


def test_a_torn_tail_at_every_byte_of_the_last_record_is_reported_not_yielded_and_cut_on_reopen(tmp_path):
    whole = tmp_path / "whole.mej"
    frame_lists, offsets = _small_journal(whole)
    data, last = whole.read_bytes(), offsets[-1]
    assert len(data) - last > 40
    torn_path = tmp_path / "torn.mej"
    for cut in range(last + 1, len(data)):  # the last record cut after 1, 2, ... all but one of its bytes
        torn_path.write_bytes(data[:cut])
        with pytest.warns(TornTailWarning, match=f"at byte {last} "):
            records = list(read_journal(torn_path))
        assert [r.frames for r in records] == [tuple(f) for f in frame_lists[:-1]]
        report = check_journal(torn_path)
        assert (report.n_records, report.intact_bytes) == (2, last)
        assert (report.torn_tail.offset, report.torn_tail.n_bytes) == (last, cut - last)

        with pytest.warns(TornTailWarning, match="cut a torn tail"):
            writer = JournalWriter(torn_path, fsync="never")  # durability is not under test here: fast
        assert writer.next_index == 2 and writer.recovered_torn_tail == report.torn_tail
        assert writer.append(frame_lists[-1], T0 + 0.5 * 2) == 2  # as the first time
        writer.close()
        assert torn_path.read_bytes() == data  # the tail cut, the record appended again: the same file


def test_a_torn_file_header_starts_the_journal_afresh(tmp_path):
    whole = tmp_path / "whole.mej"
    frame_lists, offsets = _small_journal(whole)
    path = tmp_path / "torn.mej"
    for cut in range(0, offsets[0]):
        path.write_bytes(whole.read_bytes()[:cut])
        with pytest.warns(TornTailWarning, match="at byte 0"):
            assert list(read_journal(path)) == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TornTailWarning)
            with JournalWriter(path) as writer:
                assert writer.next_index == 0 and writer.append(frame_lists[0], T0) == 0
        assert [r.frames for r in read_journal(path)] == [tuple(frame_lists[0])]


def test_a_zero_filled_last_record_is_a_torn_tail(tmp_path):
    """After a power loss a file can keep its new length while the last blocks hold zeros."""
    path = tmp_path / "zeros.mej"
    frame_lists, offsets = _small_journal(path)
    data = bytearray(path.read_bytes())
    data[offsets[-1] + 40:] = bytes(len(data) - offsets[-1] - 40)  # the lengths survive, the frames do not
    path.write_bytes(bytes(data))
    with pytest.warns(TornTailWarning, match="record CRC mismatch"):
        assert len(list(read_journal(path))) == 2
    with pytest.warns(TornTailWarning):
        writer = JournalWriter(path)
    assert writer.next_index == 2 and writer.recovered_torn_tail.offset == offsets[-1]
    writer.close()


@pytest.mark.parametrize("where, problem", [("frame", "record CRC mismatch"), ("length", "header CRC mismatch"),
                                            ("marker", "marker")])
def test_corruption_in_the_middle_raises_naming_the_record_and_offset(tmp_path, where, problem):
    path = tmp_path / "corrupt.mej"
    _, offsets = _small_journal(path)
    data = bytearray(path.read_bytes())
    byte = {"frame": offsets[1] + 44 + 5, "length": offsets[1] + 30, "marker": offsets[1]}[where]
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match=f"record 1 at byte {offsets[1]}.*{problem}") as error:
        list(read_journal(path))
    assert (error.value.index, error.value.offset) == (1, offsets[1])
    assert f"intact record follows at byte {offsets[2]}" in str(error.value)
    if where != "frame":  # the writer's recovery scan checks headers (and the last record's frames)
        with pytest.raises(JournalCorruptError):
            JournalWriter(path)


def test_reopening_continues_the_record_count_and_a_crash_mid_append_loses_only_that_record(tmp_path):
    path = tmp_path / "service.mej"
    messages = _visit(3, shape=(4, 5, 6))
    frame_lists = [[bytes(f) for f in encode(m)] for m in messages]
    assert _write(path, frame_lists[:3]) == [0, 1, 2]
    assert _write(path, frame_lists[3:5]) == [3, 4]

    # The service dies while appending record 5: half of it reaches the file.
    scratch = tmp_path / "scratch.mej"
    _write(scratch, frame_lists[:6])
    record_5 = list(read_journal(scratch))[5]
    whole = scratch.read_bytes()
    with open(path, "ab") as file:
        file.write(whole[record_5.offset:record_5.offset + (len(whole) - record_5.offset) // 2])

    with pytest.warns(TornTailWarning):
        writer = JournalWriter(path)
    assert writer.next_index == 5 and writer.recovered_torn_tail.offset == record_5.offset
    assert writer.append(frame_lists[5], T0 + 5.0) == 5
    writer.close()
    assert [r.message() for r in read_journal(path)] == messages[:6]


def test_the_fsync_policy_sets_how_often_records_reach_the_disk(tmp_path, monkeypatch):
    calls = []
    real_fsync = mindeye.journal.os.fsync
    monkeypatch.setattr(mindeye.journal.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    frames = [b'{"x": 1}']
    for policy, during, at_close in (("always", 7, 0), (3, 2, 1), ("never", 0, 0)):
        writer = JournalWriter(tmp_path / f"{policy}.mej", fsync=policy)
        calls.clear()
        for i in range(7):
            writer.append(frames, T0 + i)
        assert len(calls) == during, policy
        writer.close()
        assert len(calls) == during + at_close, policy
    for bad in ("sometimes", 0, -2, True, 1.5):
        with pytest.raises(ValueError, match="fsync must be"):
            JournalWriter(tmp_path / "bad.mej", fsync=bad)


def test_bad_appends_and_bad_files_are_refused_clearly(tmp_path):
    path = tmp_path / "j.mej"
    with JournalWriter(path) as writer:
        with pytest.raises(ValueError, match="1 to 64 frames"):
            writer.append([], T0)
        with pytest.raises(ValueError, match="finite"):
            writer.append([b"{}"], float("nan"))
        with pytest.raises(RuntimeError, match="another process is writing"):
            JournalWriter(path)
    with pytest.raises(ValueError, match="closed"):
        writer.append([b"{}"], T0)

    other = tmp_path / "notes.txt"
    other.write_text("not a journal at all")
    with pytest.raises(FormatError, match="not a journal"):
        list(read_journal(other))
    with pytest.raises(FormatError, match="not a journal"):
        JournalWriter(other)
    future = tmp_path / "future.mej"
    future.write_bytes(mindeye.journal.MAGIC + (2).to_bytes(4, "little"))
    with pytest.raises(FormatError, match="format version should be 1, found 2"):
        list(read_journal(future))


def test_two_journals_concatenated_are_refused_by_record_index(tmp_path):
    first, second = tmp_path / "a.mej", tmp_path / "b.mej"
    _small_journal(first)
    _small_journal(second)
    glued = tmp_path / "glued.mej"
    glued.write_bytes(first.read_bytes() + second.read_bytes()[len(mindeye.journal.MAGIC) + 4:])
    with pytest.raises(FormatError, match="index 3 \\(records count up from 0\\), found index 0"):
        list(read_journal(glued))


def test_no_pickle_in_the_journal():
    source = Path(mindeye.journal.__file__)
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = {alias.name.split(".")[0] for alias in node.names}
            names |= {node.module.split(".")[0]} if isinstance(node, ast.ImportFrom) and node.module else set()
            assert not names & {"pickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
