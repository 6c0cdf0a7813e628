"""The live web viewer: the page in headless Chromium, the SSE stream, the image and JSON routes, the relay."""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urlsplit

import numpy as np
import pytest
import zmq
from PIL import Image

from mindeye.nsd import StimulusBrick
from mindeye.nsd.files import write_stimuli
from mindeye.protocol import (Envelope, Result, Retrieval, Volume, bound_endpoint, result_publisher, result_subscriber,
                              send)
from mindeye.protocol.messages import Motion
from realtime.viewer import LiveViewer
from realtime.viewer.__main__ import relay
from realtime.viewer.server import CLIENT_QUEUE_EVENTS

STAGES_MS = {"receive": 0.1, "journal": 0.8, "glm": 2.0, "queue": 1.0, "decode": 4.0, "generate": 90.0, "publish": 0.5}


def png_bytes(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A real PNG: a colour ramp, so two images never compare equal by accident."""
    ramp_hw = np.linspace(0, 1, size * size).reshape(size, size)
    image_hwc = (np.array(rgb)[None, None, :] * ramp_hw[..., None]).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def make_result(trial: int, *, image_id: int | None, top_ids: tuple[int, ...] = (), flags: tuple[str, ...] = (),
                lowlevel: bool = False, end_to_end_ms: float = 100.0, session: str = "subj01-nsd01", run: int = 1,
                candidate: bool | None = True) -> Result:
    """`candidate`: the service's image_is_candidate for a decoded trial with a known image (else null)."""
    skipped = "skipped" in flags
    scores = np.linspace(0.5, 0.2, len(top_ids)) if top_ids else []
    return Result(session=session, run=run, trial=trial, image_id=image_id, volume_index=10 + 3 * trial,
                  embedding_norm=None if skipped else 30.0,
                  top_k=tuple(Retrieval(i, float(s)) for i, s in zip(top_ids, scores)),
                  timings_ms={**STAGES_MS, "end_to_end": end_to_end_ms}, flags=flags,
                  envelope=Envelope("0123456789abcdef", trial, 1.7e9 + trial),
                  image_png=None if skipped else png_bytes((255, 40 * trial % 256, 80)),
                  lowlevel_png=png_bytes((60, 60, 255)) if lowlevel and not skipped else None,
                  image_is_candidate=None if skipped or image_id is None else candidate)


@pytest.fixture
def brick(tmp_path) -> StimulusBrick:
    images_nhwc = np.random.default_rng(0).integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
    path = tmp_path / "nsd_stimuli.hdf5"
    write_stimuli(path, images_nhwc)
    return StimulusBrick(path)


@pytest.fixture
def viewer(brick):
    viewer = LiveViewer(port=0, stimuli=brick, title="test viewer")
    viewer.start()
    yield viewer
    viewer.stop()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# ---- the page in a real browser -------------------------------------------------------------------

class Dom(HTMLParser):
    """Start tags in document order: attributes, classes, `trial` (the data-trial of the nearest element
    around it that has one: its card, its plot bar) and text."""

    VOID = {"img", "br", "meta", "link", "input", "hr", "source", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        trial = next((e["attrs"]["data-trial"] for e in reversed(self._open) if "data-trial" in e["attrs"]), None)
        element = {"tag": tag, "attrs": attrs, "classes": set((attrs.get("class") or "").split()), "trial": trial,
                   "text": []}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for element in self._open:
            element["text"].append(data)

    def select(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and (cls is None or cls in e["classes"])]

    def text(self, element_id: str) -> str:
        element = next(e for e in self.elements if e["attrs"].get("id") == element_id)
        return "".join(element["text"]).strip()


def require_chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("MINDEYE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("MINDEYE_REQUIRE_CHROMIUM=1 but no 'chromium' on PATH (Debian: apt-get install chromium)")
        pytest.skip("no 'chromium' on PATH (Debian: apt-get install chromium); MINDEYE_REQUIRE_CHROMIUM=1 "
                    "makes this a failure")
    return path


def open_page(browser, url: str, *, cards: int, status_text: str) -> None:
    """Open the viewer and wait until it shows `cards` cards, the latency plot's 3 bars and the status counters."""
    browser.open(url)
    browser.wait_for(f"document.querySelectorAll('article.card').length === {cards} "
                     "&& document.querySelectorAll('#latency-plot g.bar').length === 3 "
                     f"&& document.getElementById('status').textContent.includes('{status_text}')")


def test_screenshot_command_waits_for_the_trials(viewer, tmp_path, capsys):
    from PIL import Image

    from realtime.viewer.headless import main as screenshot

    require_chromium()
    for n in range(2):
        viewer.show(make_result(n, image_id=2, top_ids=(2, 4, 5), lowlevel=True, end_to_end_ms=100.0))
    out = tmp_path / "viewer.png"
    assert screenshot([viewer.url, str(out), "--cards", "2", "--size", "640x480"]) == 0
    assert Image.open(out).size == (640, 480)
    # a third trial never comes: a one-line failure naming the page, no file, no traceback
    missing = tmp_path / "never.png"
    assert screenshot([viewer.url, str(missing), "--cards", "3", "--timeout", "1"]) == 1
    assert not missing.exists() and f"screenshot of {viewer.url} failed" in capsys.readouterr().out


def test_page_renders_history_in_chromium(viewer):
    from realtime.viewer.headless import HeadlessChromium

    chromium = require_chromium()
    results = [make_result(0, image_id=2, top_ids=(2, 4, 5), lowlevel=True, end_to_end_ms=110.0),  # top-1 hit
               make_result(1, image_id=3, flags=("skipped",), end_to_end_ms=5.0),
               make_result(2, image_id=1, top_ids=(4, 1, 0), flags=("late",), end_to_end_ms=180.0),  # seen at rank 2
               make_result(3, image_id=None, top_ids=(5, 0, 2), end_to_end_ms=95.0)]
    for result in results:  # before the page loads: they reach it as the stream's history
        viewer.show(result)
    viewer.set_status({"volumes_accepted": 42, "queue_length": 3})
    for index, fd_mm in enumerate((0.0, 0.2, 0.9, 0.1)):  # volume 2 moved more than the 0.5 mm threshold
        viewer.show_motion(moving_volume(index, fd_mm))

    with HeadlessChromium(chromium, window=(1400, 3000)) as browser:  # tall: no image waits for a scroll
        open_page(browser, viewer.url, cards=4, status_text="42")
        loaded = browser.wait_for("[...document.images].every(i => i.complete) && "
                                  "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        dom = Dom(browser.dom())

    assert all(width > 0 for _, width in loaded), f"images that did not load: {loaded}"
    cards = dom.select("article", "card")
    assert [c["attrs"]["data-trial"] for c in cards] == ["3", "2", "1", "0"]  # newest first
    recon = {e["trial"]: e["attrs"]["src"] for e in dom.select("img", "recon")}
    assert recon == {"0": "/result/0/image.png", "2": "/result/2/image.png", "3": "/result/3/image.png"}
    assert {e["trial"]: e["attrs"]["src"] for e in dom.select("img", "lowlevel")} == {"0": "/result/0/lowlevel.png"}
    seen = {e["trial"]: e["attrs"]["src"] for e in dom.select("img", "seen")}
    assert seen == {"0": "/stimulus/2.png", "1": "/stimulus/3.png", "2": "/stimulus/1.png"}  # trial 3: unknown
    hits = [(e["trial"], e["attrs"]["data-image-id"]) for e in dom.select("li", "hit")]
    assert hits == [("2", "1"), ("0", "2")]
    assert [len([e for e in dom.select("li", "cand") if e["trial"] == t]) for t in "3210"] == [3, 3, 0, 3]
    by_trial = {c["attrs"]["data-trial"]: c["classes"] for c in cards}
    assert "hit-top1" in by_trial["0"] and "hit-top1" not in by_trial["2"]
    assert "is-skipped" in by_trial["1"] and "is-late" in by_trial["2"]

    bars = dom.select("g", "bar")
    assert [b["attrs"]["data-trial"] for b in bars] == ["0", "2", "3"]  # decoded trials, arrival order
    assert [e["attrs"]["data-n"] for e in dom.select("circle", "e2e")] == ["0", "2", "3"]
    assert [e["attrs"]["data-n"] for e in dom.select("circle", "late")] == ["2"]
    stage_rects = [e["trial"] for e in dom.select("rect", "stage")]
    assert stage_rects == ["0"] * 7 + ["2"] * 7 + ["3"] * 7  # one stacked segment per stage
    assert "latency (ms)" in [e["text"][0] for e in dom.select("text", "axis-label")]
    assert dom.text("stat-trials") == "4" and dom.text("stat-skipped") == "1" and dom.text("stat-late") == "1"
    assert dom.text("stat-top1") == "50.0 % (1 of 2)"  # decoded trials with a known image: 0 (hit) and 2 (miss)
    assert dom.text("stat-p50") == "110 ms"  # decoded end-to-end: 95, 110, 180
    status = dom.text("status")
    assert "volumes accepted" in status and "42" in status and "queue length" in status
    fd_bars = dom.select("rect", "fd")
    assert [b["attrs"]["data-index"] for b in fd_bars] == ["0", "1", "2", "3"]  # one bar per volume, in order
    assert [b["attrs"]["data-index"] for b in fd_bars if "over" in b["classes"]] == ["2"]
    assert dom.text("motion-summary") == "4 volumes, largest FD 0.90 mm, 1 over 0.5 mm"


def moving_volume(index: int, fd_mm: float, session: str = "subj01-nsd01") -> Volume:
    """A small volume carrying head motion, as mindeye-bridge sends it."""
    return Volume.from_array(np.zeros((2, 2, 2), np.float32), session=session, subject="subj01", run=1, index=index,
                             acq_time_s=index * 1.5, tr_s=1.5, affine=np.eye(4),
                             envelope=Envelope("b1", index, 1.7e9), motion=Motion((0.1 * index, 0, 0, 0, 0, 0), fd_mm))


# ---- the event stream -----------------------------------------------------------------------------

def open_events(viewer: LiveViewer) -> http.client.HTTPResponse:
    address = urlsplit(viewer.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("GET", "/events")
    response = connection.getresponse()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    return response


def next_event(response: http.client.HTTPResponse) -> tuple[str, dict]:
    """(event name, JSON data) of the next event, skipping keep-alive comments."""
    name, data = None, None
    while True:
        line = response.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
        elif line == "" and name is not None:
            return name, data


def test_result_shown_after_connecting_arrives_live(viewer):
    viewer.show(make_result(0, image_id=1, top_ids=(1, 2)))
    response = open_events(viewer)
    assert next_event(response)[0] == "hello"
    name, old = next_event(response)
    assert (name, old["trial"], old["n"]) == ("result", 0, 0)  # the history first
    assert [next_event(response)[0] for _ in range(3)] == ["summary", "motion", "status"]

    viewer.show(make_result(7, image_id=4, top_ids=(3, 4), flags=("late",)))
    name, live = next_event(response)
    assert (name, live["trial"], live["n"], live["flags"]) == ("result", 7, 1, ["late"])
    assert live["top_k"] == [{"image_id": 3, "score": 0.5}, {"image_id": 4, "score": 0.2}]
    assert live["image_url"] == "/result/1/image.png" and live["lowlevel_url"] is None
    name, summary = next_event(response)
    assert (name, summary["trials"], summary["late"], summary["top1_hits"], summary["top1_countable"]) == \
        ("summary", 2, 1, 1, 2)
    viewer.set_status({"queue_length": 5})
    assert next_event(response) == ("status", {"queue_length": 5})
    response.close()


def test_motion_streams_live_flags_volumes_over_the_threshold_and_restarts_with_a_session(viewer):
    viewer.show_motion(moving_volume(0, 0.0))
    response = open_events(viewer)
    name, hello = next_event(response)
    assert (name, hello["fd_threshold_mm"]) == ("hello", 0.5)
    assert [next_event(response)[0] for _ in range(1)] == ["summary"]
    name, snapshot = next_event(response)
    assert (name, snapshot["snapshot"], len(snapshot["points"])) == ("motion", True, 1)
    assert next_event(response)[0] == "status"
    viewer.show_motion(moving_volume(1, 0.7))
    name, live = next_event(response)
    assert name == "motion" and not live["snapshot"]
    assert live["points"] == [{"session": "subj01-nsd01", "run": 1, "index": 1, "fd_mm": 0.7,
                               "params": [0.1, 0.0, 0.0, 0.0, 0.0, 0.0], "over": True}]
    assert live["summary"] == {"session": "subj01-nsd01", "volumes": 2, "over": 1, "fd_max_mm": 0.7}
    response.close()
    with urllib.request.urlopen(viewer.url + "motion.json", timeout=10) as answer:
        motion = json.load(answer)
    assert [p["over"] for p in motion["points"]] == [False, True] and motion["fd_threshold_mm"] == 0.5
    viewer.show_motion(moving_volume(0, 0.3, session="subj01-nsd02"))  # a new session: its own counts
    with urllib.request.urlopen(viewer.url + "motion.json", timeout=10) as answer:
        assert json.load(answer)["summary"] == {"session": "subj01-nsd02", "volumes": 1, "over": 0, "fd_max_mm": 0.3}
    with pytest.raises(TypeError, match="carrying motion"):
        viewer.show_motion(Volume.from_array(np.zeros((2, 2, 2), np.float32), session="s", subject="x", run=1,
                                             index=0, acq_time_s=0.0, tr_s=1.5, affine=np.eye(4),
                                             envelope=Envelope("b1", 9, 1.7e9)))
    with pytest.raises(ValueError, match="fd_threshold_mm must be > 0"):
        LiveViewer(fd_threshold_mm=0.0)


def test_unread_client_never_blocks_show_and_resyncs(viewer):
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes stall soon
    address = urlsplit(viewer.url)
    slow.connect((address.hostname, address.port))
    slow.sendall(b"GET /events HTTP/1.0\r\n\r\n")
    deadline = time.monotonic() + 10
    while not viewer.backlogs() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert viewer.backlogs() == [0]

    result = make_result(0, image_id=1, top_ids=tuple(range(40)))  # ~1.5 kB per update
    backlog_peak, started = 0, time.monotonic()
    for i in range(10_000):  # ~15 MB of updates: far more than the socket buffers hold for a browser not reading
        viewer.show(result)
        if i % 50 == 0:
            backlog_peak = max(backlog_peak, *viewer.backlogs())
    print(f"10,000 show() calls with an unread browser: {time.monotonic() - started:.2f} s")
    assert len(viewer.backlogs()) == 1 and backlog_peak <= CLIENT_QUEUE_EVENTS

    # Reading again, it gets what the socket held, then the current history up to the newest result.
    slow.settimeout(10)
    stream = b""
    while b"\nid: 9999\n" not in stream[-4096:]:
        chunk = slow.recv(1 << 20)
        assert chunk, "stream closed before the newest result arrived"
        stream += chunk
    slow.close()
    received = {int(line[4:]) for line in stream.split(b"\n") if line.startswith(b"id: ")}
    assert 9999 in received and len(received) < 10_000  # updates were dropped, not queued without bound
    assert stream.count(b"event: hello\n") >= 2  # a resync after the overflow


# ---- images and JSON ------------------------------------------------------------------------------

def test_stimulus_png_equals_the_brick_image(viewer, brick):
    for image_id in (3, 0, 3):  # the second 3 comes from the cache
        status, body = get(f"{viewer.url}stimulus/{image_id}.png")
        assert status == 200 and body.startswith(b"\x89PNG")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), brick[image_id][0])
    assert get(f"{viewer.url}stimulus/6.png")[0] == 404  # the brick holds 6 images
    assert get(f"{viewer.url}stimulus/x.png")[0] == 404

    no_brick = LiveViewer(port=0)
    no_brick.start()
    try:
        assert get(f"{no_brick.url}stimulus/0.png")[0] == 404
        assert json.loads(get(f"{no_brick.url}results.json")[1])["stimuli"] is False
    finally:
        no_brick.stop()


def test_status_results_and_result_images(brick):
    viewer = LiveViewer(port=0, stimuli=brick, history=2)
    viewer.start()
    try:
        assert json.loads(get(f"{viewer.url}status.json")[1]) == {}
        status = {"volumes_accepted": 12, "volumes_rejected": 1, "queue_length": 0}
        viewer.set_status(status)
        status["volumes_accepted"] = 99  # the viewer keeps its own copy
        assert json.loads(get(f"{viewer.url}status.json")[1]) == {"volumes_accepted": 12, "volumes_rejected": 1,
                                                                    "queue_length": 0}
        with pytest.raises(TypeError, match="JSON-able"):
            viewer.set_status({"when": object()})
        with pytest.raises(TypeError, match="Result"):
            viewer.show({"trial": 1})

        shown = [make_result(t, image_id=t, top_ids=(t, 5), lowlevel=True) for t in range(3)]
        for result in shown:
            viewer.show(result)
        listing = json.loads(get(f"{viewer.url}results.json")[1])
        assert [r["trial"] for r in listing["results"]] == [1, 2]  # history=2: the oldest was evicted
        assert listing["results"][0]["image_url"] == "/result/1/image.png"
        assert listing["summary"]["trials"] == 3 and listing["summary"]["top1_hits"] == 3
        assert get(f"{viewer.url}result/2/lowlevel.png") == (200, bytes(shown[2].lowlevel_png))
        assert get(f"{viewer.url}result/1/image.png") == (200, bytes(shown[1].image_png))
        assert get(f"{viewer.url}result/0/image.png")[0] == 404  # evicted
        assert get(f"{viewer.url}result/3/image.png")[0] == 404  # never shown
        page = get(viewer.url)[1].decode()
        assert "<title>MindEye2 live</title>" in page and 'src="/static/viewer.js"' in page
        assert get(f"{viewer.url}static/viewer.css")[0] == 200 and get(f"{viewer.url}static/x.js")[0] == 404
    finally:
        viewer.stop()


def test_summary_counts_decoded_trials_and_restarts_with_a_session(viewer):
    e2e_ms = [120.0, 80.0, 300.0, 95.0, 101.0]
    for trial, ms in enumerate(e2e_ms):
        viewer.show(make_result(trial, image_id=trial, top_ids=(trial if trial % 2 else 5, 5), end_to_end_ms=ms))
    viewer.show(make_result(9, image_id=9, flags=("skipped",), end_to_end_ms=1.0))
    summary = json.loads(get(f"{viewer.url}results.json")[1])["summary"]
    assert (summary["trials"], summary["skipped"], summary["top1_countable"], summary["top1_hits"]) == (6, 1, 5, 2)
    assert summary["top1_rate"] == pytest.approx(0.4)
    assert summary["end_to_end_p50_ms"] == pytest.approx(np.percentile(e2e_ms, 50))  # the skipped 1 ms is out
    assert summary["end_to_end_p95_ms"] == pytest.approx(np.percentile(e2e_ms, 95))

    viewer.show(make_result(0, image_id=None, session="subj02-nsd01"))
    summary = json.loads(get(f"{viewer.url}results.json")[1])["summary"]
    assert (summary["session"], summary["trials"], summary["top1_countable"]) == ("subj02-nsd01", 1, 0)
    assert summary["top1_rate"] is None


def test_hit_rate_counts_only_trials_whose_seen_image_is_a_candidate(viewer):
    viewer.show(make_result(0, image_id=1, top_ids=(1, 2)))  # a candidate, hit
    viewer.show(make_result(1, image_id=2, top_ids=(3, 2)))  # a candidate, missed
    viewer.show(make_result(2, image_id=7, top_ids=(1, 2), candidate=False))  # cannot be hit: not counted
    viewer.show(make_result(3, image_id=4, top_ids=(4, 2), candidate=None))  # an older service: unknown
    listing = json.loads(get(f"{viewer.url}results.json")[1])
    summary = listing["summary"]
    assert (summary["trials"], summary["top1_countable"], summary["top1_hits"]) == (4, 2, 1)
    assert summary["top1_text"] == "50.0 % (1 of 2 trials whose seen image was a candidate)"
    # The page gets each trial's verdict from the server (realtime.hits), not a rule of its own.
    assert [(r["top1_hit"], r["image_is_candidate"]) for r in listing["results"]] == \
        [(True, True), (False, True), (None, False), (None, None)]


def test_page_explains_scores_runs_and_candidates_in_chromium(viewer):
    from realtime.viewer.headless import HeadlessChromium

    chromium = require_chromium()
    viewer.show(make_result(0, image_id=2, top_ids=(2, 4), run=1))
    viewer.show(make_result(1, image_id=5, top_ids=(4, 2), run=1, candidate=False))  # its top-k cannot be right
    viewer.show(make_result(0, image_id=3, top_ids=(3, 1), run=2))  # trial numbers restart with the run
    viewer.set_status({"decode_pending": 0, "acks": 12})

    with HeadlessChromium(chromium, window=(1400, 2000)) as browser:
        open_page(browser, viewer.url, cards=3, status_text="12")
        folded = browser.wait_for("document.querySelector('details#details > #status') !== null "
                                  "&& [document.getElementById('details').open]")
        dom = Dom(browser.dom())

    assert folded == [False]  # the service's counters sit in a closed <details>, out of the researcher's way
    warnings = [(e["trial"], "".join(e["text"])) for e in dom.select("p", "not-candidate")]
    assert len(warnings) == 1 and warnings[0][0] == "1" and "not among the retrieval candidates" in warnings[0][1]
    assert "cosine similarity of the predicted CLIP embedding" in "".join(dom.select("div", "topk-head")[0]["text"])
    page_text = "".join(t for e in dom.elements for t in e["text"])
    assert "|emb|" not in page_text and "length of the predicted CLIP embedding 30.0" in page_text
    # One separator where run 2 starts; each run labelled.
    assert len(dom.select("line", "run-sep")) == 1
    assert [e["attrs"]["data-run"] for e in dom.select("text", "run-label")] == ["1", "2"]
    assert "acks" in dom.text("status")
    assert "among trials whose seen image was a candidate" in page_text


# ---- standalone mode ------------------------------------------------------------------------------

def test_relay_shows_published_results(viewer):
    context = zmq.Context()
    publisher = result_publisher(context, "tcp://127.0.0.1:*")
    subscriber = result_subscriber(context, bound_endpoint(publisher))
    stop = threading.Event()
    thread = threading.Thread(target=relay, args=(subscriber, viewer, stop),
                              kwargs={"session": "subj01-nsd01", "source": "test"})
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not json.loads(get(f"{viewer.url}results.json")[1])["results"]:  # a SUB joins late
            assert time.monotonic() < deadline, "the relay never showed a result"
            send(publisher, make_result(0, image_id=1, top_ids=(1,)))
            time.sleep(0.05)
        send(publisher, make_result(5, image_id=2, top_ids=(3, 2), lowlevel=True))
        send(publisher, make_result(6, image_id=2, session="subj09-other"))
        publisher.send_multipart([b"not json"])
        send(publisher, make_result(7, image_id=None, top_ids=(4,)))
        deadline = time.monotonic() + 10
        while json.loads(get(f"{viewer.url}results.json")[1])["results"][-1]["trial"] != 7:
            assert time.monotonic() < deadline, "trial 7 never arrived"
            time.sleep(0.02)
        listing = json.loads(get(f"{viewer.url}results.json")[1])
        trials = [r["trial"] for r in listing["results"]]
        assert trials[-2:] == [5, 7] and 6 not in trials
        status = listing["status"]
        assert (status["other_sessions"], status["malformed"]) == (1, 1)
        assert status["shown"] == len(trials) and status["received"] == len(trials) + 1
        png = get(f"{viewer.url}result/{listing['results'][-2]['n']}/lowlevel.png")[1]
        assert png == png_bytes((60, 60, 255))  # the PNG frame survived the wire and the relay
    finally:
        stop.set()
        thread.join()
        subscriber.close()
        publisher.close()
        context.term()


def test_cli_help_explains_the_options():
    done = subprocess.run([sys.executable, "-m", "realtime.viewer", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    for option in ("--results", "--stimuli", "--port", "--host", "--session", "--curve-secret"):
        assert option in done.stdout
