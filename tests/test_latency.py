"""The service's latency log and report: statistics against numpy, what counts and what is excluded,
a log continued after a restart, malformed files, the written JSON and PNG, and the command line."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindeye.errors import FormatError, MissingFileError
from mindeye.protocol import TIMING_STAGES, Envelope, Result, Retrieval, Volume
from mindeye.protocol.messages import BridgeTimes, Motion
from realtime.latency import (COLUMNS, VOLUMES_CSV, LatencyLog, VolumeLog, main, read_latency_csv, read_volumes_csv,
                              summarize, write_report)

PUBLISHED_S = 1.7e9


def _result(trial: int, end_to_end_ms: float | None, *, flags: tuple[str, ...] = (), image_id: int | None = 7,
            top1: int | None = 7, run: int = 1, candidate: bool | None = True, **stages_ms: float) -> Result:
    """A result whose timings are `stages_ms` plus end_to_end; decoded ones get decode and generate times."""
    timings_ms = dict(stages_ms)
    if "skipped" not in flags:
        timings_ms = {"decode": 40.0, "generate": 900.0} | timings_ms
    if end_to_end_ms is not None:
        timings_ms["end_to_end"] = end_to_end_ms
    top_k = () if top1 is None or "skipped" in flags else (Retrieval(top1, 0.5), Retrieval(top1 + 1, 0.4))
    decoded_seen = "skipped" not in flags and image_id is not None
    return Result("subj01-nsd01", run, trial, image_id, 3 * trial + 5, None if "skipped" in flags else 30.0, top_k,
                  timings_ms, flags, envelope=Envelope("test", trial, 0.0),
                  image_is_candidate=candidate if decoded_seen else None)


def _write(path: Path, results: list[Result]) -> None:
    with LatencyLog(path) as latency_log:
        for i, result in enumerate(results):
            latency_log.add(result, published_unix_s=PUBLISHED_S + i, batch_size=1)


def test_percentiles_match_numpy(tmp_path):
    end_to_end_ms = np.random.default_rng(0).permutation(np.arange(1, 101)).astype(float)
    _write(tmp_path / "latency.csv", [_result(i, float(ms)) for i, ms in enumerate(end_to_end_ms)])

    report = summarize(read_latency_csv(tmp_path / "latency.csv"))

    stats = report.stages["end_to_end"]
    assert stats["n"] == 100
    assert stats["p50"] == pytest.approx(50.5) and stats["p95"] == pytest.approx(95.05)
    for q in (50, 90, 95, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(end_to_end_ms, q))
    assert stats["mean"] == pytest.approx(50.5) and stats["max"] == 100.0
    assert report.stages["generate"] == {"n": 100, "mean": 900.0, "p50": 900.0, "p90": 900.0, "p95": 900.0,
                                         "p99": 900.0, "max": 900.0}
    assert list(report.stages) == ["decode", "generate", "end_to_end"]  # TIMING_STAGES order, absent ones left out


def test_skipped_and_recovered_are_counted_but_not_timed(tmp_path):
    results = [_result(i, ms) for i, ms in enumerate([10.0, 20.0, 30.0, 40.0, 50.0])]
    results += [_result(5, 1000.0, flags=("skipped",), receive=0.1, glm=2.0),
                _result(6, 2000.0, flags=("skipped", "late"), receive=0.1),
                _result(7, 99_999.0, flags=("recovered",)),
                _result(8, 60.0, flags=("late",), queue=3.0)]
    _write(tmp_path / "latency.csv", results)

    report = summarize(read_latency_csv(tmp_path / "latency.csv"))

    assert (report.n_results, report.n_decoded, report.n_skipped, report.n_late, report.n_recovered) == (9, 7, 2, 2, 1)
    assert report.stages["end_to_end"]["n"] == 6
    assert report.stages["end_to_end"]["mean"] == pytest.approx(35.0)
    assert report.stages["end_to_end"]["max"] == 60.0
    assert "receive" not in report.stages and "glm" not in report.stages  # only skipped results ran them
    assert report.stages["queue"]["n"] == 1


def test_absent_stages_and_hits(tmp_path):
    results = [_result(0, 10.0, image_id=7, top1=7, queue=5.0),
               _result(1, 20.0, image_id=8, top1=3),
               _result(2, 30.0, image_id=None, top1=3, queue=7.0),  # image unknown: no hit either way
               _result(3, 40.0, image_id=9, top1=9),
               _result(4, None, flags=("skipped",), image_id=9),  # no top-1
               _result(5, 50.0, image_id=11, top1=3, candidate=False),  # not a candidate: could not be hit
               _result(6, 60.0, image_id=12, top1=12, candidate=None)]  # an older service: unknown
    _write(tmp_path / "latency.csv", results)

    rows = read_latency_csv(tmp_path / "latency.csv")
    report = summarize(rows)

    assert [row["hit"] for row in rows] == [True, False, None, True, None, None, None]
    assert (report.top1_hits, report.top1_countable) == (2, 3)
    assert "top-1 hit rate 66.7 % (2 of 3 trials whose seen image was a candidate)" in report.format()
    assert [row["queue"] for row in rows] == [5.0, None, 7.0, None, None, None, None]
    assert rows[4]["top1_image_id"] is None and rows[4]["flags"] == ("skipped",) and rows[4]["end_to_end"] is None
    assert report.top1_hit_rate == pytest.approx(2 / 3)
    assert report.stages["queue"]["n"] == 2 and report.stages["queue"]["mean"] == pytest.approx(6.0)
    assert report.stages["end_to_end"]["n"] == 6
    assert summarize([]) == summarize(rows[:0])
    assert summarize([]).top1_hit_rate is None and summarize([]).stages == {}


def test_row_round_trip(tmp_path):
    result = _result(3, 99.5, flags=("late", "merged"), receive=0.04, journal=0.9, glm=2.1, queue=1.5, publish=0.6)
    with LatencyLog(tmp_path / "latency.csv") as latency_log:
        latency_log.add(result, published_unix_s=1767225655.0125, batch_size=4)

    (row,) = read_latency_csv(tmp_path / "latency.csv")

    assert row == {"session": "subj01-nsd01", "run": 1, "trial": 3, "image_id": 7, "volume_index": 14,
                   "published_unix_s": 1767225655.0125, "batch_size": 4, "flags": ("late", "merged"),
                   **{stage: result.timings_ms.get(stage) for stage in TIMING_STAGES},
                   "top1_image_id": 7, "hit": True}


def test_a_restarted_service_continues_the_table(tmp_path):
    path = tmp_path / "latency.csv"
    _write(path, [_result(i, 10.0 * (i + 1)) for i in range(3)])
    with open(path, "a") as file:  # the first process died while writing a row
        file.write("subj01-nsd01,1,3,7,14,17000")

    _write(path, [_result(i, 10.0 * (i + 1), flags=("recovered",) if i == 3 else ()) for i in range(3, 5)])

    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and lines.count(lines[0]) == 1
    rows = read_latency_csv(path)
    assert [row["trial"] for row in rows] == [0, 1, 2, 3, 4]
    report = summarize(rows)
    assert (report.n_results, report.n_recovered, report.stages["end_to_end"]["n"]) == (5, 1, 4)


def test_a_log_with_another_header_is_refused(tmp_path):
    path = tmp_path / "latency.csv"
    path.write_text("trial,ms\n0,12.5\n")

    with pytest.raises(FormatError, match=r"line 1 \(header\).*found trial,ms"):
        LatencyLog(path)
    assert path.read_text() == "trial,ms\n0,12.5\n"  # left as it was


@pytest.mark.parametrize(("edit", "message"), [
    (lambda cells: cells.__setitem__(COLUMNS.index("glm"), "fast"), r"line 3, column 'glm'.*'fast'"),
    (lambda cells: cells.__setitem__(COLUMNS.index("end_to_end"), "-1.0"), r"line 3, column 'end_to_end'"),
    (lambda cells: cells.__setitem__(COLUMNS.index("run"), ""), r"line 3, column 'run'"),
    (lambda cells: cells.__setitem__(COLUMNS.index("hit"), "yes"), r"line 3, column 'hit'"),
    (lambda cells: cells.pop(), rf"line 3 should be {len(COLUMNS)} comma-separated cells, found {len(COLUMNS) - 1}"),
])
def test_a_malformed_line_names_line_and_column(tmp_path, edit, message):
    path = tmp_path / "latency.csv"
    _write(path, [_result(i, 10.0, glm=2.0) for i in range(3)])
    lines = path.read_text().splitlines()
    cells = lines[2].split(",")
    edit(cells)
    path.write_text("\n".join([*lines[:2], ",".join(cells), *lines[3:]]) + "\n")

    with pytest.raises(FormatError, match=message):
        read_latency_csv(path)


def test_write_report_writes_json_and_png(tmp_path):
    results = [_result(i, 900.0 + 10 * i, run=1 + i // 15, queue=float(i % 4), flags=("late",) if i == 20 else ())
               for i in range(30)]
    results[5] = _result(5, 12.0, flags=("skipped",), receive=0.1)
    results[9] = _result(9, 60_000.0, flags=("recovered",))
    _write(tmp_path / "latency.csv", results)

    report = write_report(tmp_path / "latency.csv", out_dir=tmp_path / "report")

    assert report == summarize(read_latency_csv(tmp_path / "latency.csv"))
    assert json.loads((tmp_path / "report" / "latency.json").read_text()) == dataclasses.asdict(report)
    with Image.open(tmp_path / "report" / "latency.png") as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 600
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 20  # a drawn figure, not a blank page


def test_write_report_of_an_empty_log(tmp_path):
    LatencyLog(tmp_path / "latency.csv").close()

    report = write_report(tmp_path / "latency.csv")

    assert report.n_results == 0 and report.stages == {}
    assert "no decoded, non-recovered result" in report.format()
    assert (tmp_path / "latency.png").stat().st_size > 1000


def _bridge_volume(index: int, seen_unix_s: float, fd_mm: float | None) -> Volume:
    """A volume the bridge sent: file seen at `seen_unix_s`, read 20 ms later, registered 100 ms after
    that, sent 5 ms after that; None: a replayer's volume, without motion or times."""
    extra = {} if fd_mm is None else {
        "motion": Motion((0.1, 0.0, 0.0, 0.0, 0.0, 0.0), fd_mm),
        "bridge": BridgeTimes(seen_unix_s, seen_unix_s + 0.020, seen_unix_s + 0.120)}
    return Volume.from_array(np.zeros((2, 2, 2), np.float32), session="subj01-nsd01", subject="subj01", run=1,
                             index=index, acq_time_s=1.5 * index, tr_s=1.5, affine=np.eye(4),
                             envelope=Envelope("bridge", index, seen_unix_s + 0.125), **extra)


def test_the_bridge_stages_and_head_motion_join_the_report(tmp_path):
    _write(tmp_path / "latency.csv", [_result(0, 100.0)])
    with VolumeLog(tmp_path / VOLUMES_CSV) as volume_log:
        for index, fd_mm in enumerate((0.0, 0.2, 0.8, None)):  # the last from a sender without motion
            seen_unix_s = PUBLISHED_S + 1.5 * index
            volume_log.add(_bridge_volume(index, seen_unix_s, fd_mm), received_unix_s=seen_unix_s + 0.125 + 0.002)
    rows = read_volumes_csv(tmp_path / VOLUMES_CSV)
    assert [row["index"] for row in rows] == [0, 1, 2, 3] and rows[3]["fd_mm"] is None and rows[2]["fd_mm"] == 0.8

    report = write_report(tmp_path / "latency.csv")

    means = {stage: values["mean"] for stage, values in report.bridge_stages.items()}
    expected = {"file_read": 20.0, "register": 100.0, "send": 5.0, "transit": 2.0, "scanner_to_service": 127.0}
    assert means == pytest.approx(expected, abs=0.01)  # ms, from times written to the microsecond
    assert {values["n"] for values in report.bridge_stages.values()} == {3}
    assert report.motion == {"volumes": 3, "fd_mean_mm": pytest.approx(1.0 / 3), "fd_max_mm": 0.8,
                             "threshold_mm": 0.5, "volumes_over_threshold": 1}
    text = report.format()
    assert "register" in text and "head motion: 3 volumes" in text and "1 over 0.5 mm" in text
    assert json.loads((tmp_path / "latency.json").read_text())["bridge_stages"]["register"]["n"] == 3


def test_cli_writes_the_report_and_prints_the_table(tmp_path):
    _write(tmp_path / "latency.csv", [_result(i, float(ms)) for i, ms in enumerate(range(1, 101))])

    done = subprocess.run([sys.executable, "-m", "realtime.latency", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])

    assert done.returncode == 0, done.stderr
    assert "p50" in done.stdout
    end_to_end_line = next(line for line in done.stdout.splitlines() if line.startswith("end_to_end"))
    assert end_to_end_line.split()[1:] == ["100", "50.50", "50.50", "90.10", "95.05", "99.01", "100.00"]
    assert (tmp_path / "latency.json").exists() and (tmp_path / "latency.png").exists()


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--out DIR" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 3  # mindeye.cli.EXIT_CODES["missing file"]
    assert re.fullmatch(r"mindeye-latency-report: missing latency log: expected it at .*latency\.csv \(.*\)\n",
                        capsys.readouterr().err)
    with pytest.raises(MissingFileError):
        read_latency_csv(tmp_path / "latency.csv")
