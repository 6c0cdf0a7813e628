"""Watching the scanner's export folder: new files -> complete volumes, each file read only once written.

The scanner (or its export daemon) writes one or more files per volume: a NIfTI, a Siemens mosaic DICOM,
an enhanced multi-frame DICOM, or one DICOM per slice. watchdog reports each file as it is created or
changed (inotify on Linux); on a network share (SMB, NFS), where the server's writes raise no local
event, a PollingObserver lists the folder every `poll_interval_s` instead (`polling=True`). Files
already in the folder when the watcher starts are found too, so a restarted bridge sees everything.

A file counts once its size has not changed for `settle_s` and `probe` (a header-only read,
realtime.bridge.scanner_files) no longer says it is incomplete: a file still being written is probed
again later, and given up after `incomplete_timeout_s` with a log line. A corrupt file is logged once
and skipped (until it is written again). Probing gives each file its (series, volume index, part):
files are grouped into volumes by that, never by file time, and a volume is handed on once it has all
its parts (one DICOM per slice whose header does not say how many slices a volume has: once a file of
a later volume of its series is counted, or none of its own has come for `parts_wait_s`). A second
file for a part already held (the exporter wrote it twice, or under two names) is logged as a
duplicate and ignored.
"""
from __future__ import annotations

import fnmatch
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from mindeye.errors import MissingFileError

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.dcm", "*.IMA", "*.ima", "*.nii", "*.nii.gz")
IGNORED = (".*", "*.tmp", "*.part", "*.partial", "*~")  # editors' and copiers' temporary names


@dataclass(frozen=True)
class VolumeFiles:
    """The files of one volume, complete: what `read_volume` reads."""

    series_uid: str
    series_number: int
    index: int  # 0-based within its series
    paths: tuple[Path, ...]  # in part order
    seen_unix_s: float  # when its last file appeared (the bridge's "file seen" time)


@dataclass
class _Candidate:
    """A file seen but not yet counted: its size at the last look and when that size was first seen."""

    first_seen_unix_s: float
    size: int
    stable_since_s: float  # monotonic


class _Events(FileSystemEventHandler):
    """watchdog's thread puts the paths it hears of into a queue; the bridge's thread takes them."""

    def __init__(self, paths: queue.Queue):
        self.paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "moved", "closed"):
            return
        self.paths.put(Path(getattr(event, "dest_path", "") or event.src_path))


class ExportWatcher:
    """Call `start()`, then `poll()` repeatedly for the volumes completed since; `stop()` at the end.
    `probe(path)` returns a key with series_uid, series_number, index, slice_or_part, parts_expected and
    raises `incomplete` / `corrupt` (exception classes) as realtime.bridge.scanner_files does."""

    def __init__(self, folder: str | Path, *, probe: Callable[[Path], Any], incomplete: type[Exception],
                 corrupt: type[Exception], patterns: tuple[str, ...] = DEFAULT_PATTERNS, polling: bool = False,
                 poll_interval_s: float = 0.5, settle_s: float = 0.05, incomplete_timeout_s: float = 30.0,
                 parts_wait_s: float = 1.0):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MissingFileError(self.folder, "scanner export folder",
                                   "create it, or point export_dir at the folder the scanner writes to")
        self.probe, self.incomplete, self.corrupt = probe, incomplete, corrupt
        self.patterns, self.settle_s, self.incomplete_timeout_s = tuple(patterns), settle_s, incomplete_timeout_s
        self.parts_wait_s = parts_wait_s
        self._observer = (PollingObserver(timeout=poll_interval_s) if polling else Observer())
        self._heard: queue.Queue[Path] = queue.Queue()
        self._candidates: dict[Path, _Candidate] = {}
        self._done: dict[Path, int] = {}  # counted or refused files -> their size then (a rewrite is looked at again)
        self._parts: dict[tuple[str, int], dict[int, Path]] = {}  # (series, index) -> part -> file
        self._seen: dict[tuple[str, int], float] = {}  # (series, index) -> when its last part appeared
        self._open_ended: dict[tuple[str, int], tuple[int, float]] = {}  # slice count unknown: (series number, last
        # part counted, monotonic s)
        self._complete: dict[tuple[str, int], tuple[Path, ...]] = {}
        self.counters = {"files": 0, "volumes": 0, "duplicates": 0, "corrupt": 0, "incomplete_given_up": 0}

    def start(self) -> None:
        self._observer.schedule(_Events(self._heard), str(self.folder), recursive=True)
        self._observer.start()
        for path in sorted(self.folder.rglob("*")):  # what was there before: after the events start, so none is missed
            self._heard.put(path)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5.0)

    def poll(self, timeout_s: float = 0.05) -> list[VolumeFiles]:
        """The volumes whose last file was counted since the last call, after waiting at most `timeout_s`
        for news when nothing is pending."""
        try:  # files waiting to settle are looked at again after settle_s at the latest
            self._heard_of(self._heard.get(timeout=min(timeout_s, self.settle_s) if self._candidates else timeout_s))
        except queue.Empty:
            pass
        while True:
            try:
                self._heard_of(self._heard.get_nowait())
            except queue.Empty:
                break
        volumes = [volume for path in list(self._candidates) if (volume := self._look(path)) is not None]
        return volumes + self._close_open_ended()

    # ---- one file -------------------------------------------------------------------------------------

    def _heard_of(self, path: Path) -> None:
        name = path.name
        if any(fnmatch.fnmatch(name, p) for p in IGNORED) or not any(fnmatch.fnmatch(name, p) for p in self.patterns):
            return
        if path not in self._candidates:
            self._candidates[path] = _Candidate(time.time(), -1, time.monotonic())

    def _look(self, path: Path) -> VolumeFiles | None:
        candidate = self._candidates[path]
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # renamed away (a copier's temporary name) or deleted
            del self._candidates[path]
            return None
        if self._done.get(path) == size:
            del self._candidates[path]  # an event for a file already counted, unchanged
            return None
        now_s = time.monotonic()
        if size != candidate.size:
            candidate.size, candidate.stable_since_s = size, now_s
            return None
        if now_s - candidate.stable_since_s < self.settle_s:
            return None
        try:
            key = self.probe(path)
        except self.incomplete as error:
            if time.time() - candidate.first_seen_unix_s > self.incomplete_timeout_s:
                log.error("gave up on %s: still incomplete %.0f s after it appeared (%s); its volume will be missing",
                          path, self.incomplete_timeout_s, error)
                self.counters["incomplete_given_up"] += 1
                self._finish(path, size)
            return None  # still being written: looked at again on the next poll
        except self.corrupt as error:
            log.error("skipped a corrupt file %s: %s", path, error)
            self.counters["corrupt"] += 1
            self._finish(path, size)
            return None
        self._finish(path, size)
        self.counters["files"] += 1
        return self._add_part(path, key, candidate.first_seen_unix_s)

    def _finish(self, path: Path, size: int) -> None:
        del self._candidates[path]
        self._done[path] = size

    def _add_part(self, path: Path, key: Any, seen_unix_s: float) -> VolumeFiles | None:
        volume = (key.series_uid, key.index)
        held = self._complete.get(volume) or self._parts.get(volume, {}).get(key.slice_or_part)
        if held is not None and path not in (held if isinstance(held, tuple) else (held,)):
            log.warning("duplicate file %s: part %d of volume %d of series %d is already %s; ignored", path,
                        key.slice_or_part, key.index, key.series_number, held if isinstance(held, Path) else held[0])
            self.counters["duplicates"] += 1
            return None
        if volume in self._complete:
            return None  # the same file written again, after its volume was handed on
        parts = self._parts.setdefault(volume, {})
        parts[key.slice_or_part] = path
        self._seen[volume] = max(self._seen.get(volume, 0.0), seen_unix_s)
        if key.parts_expected is None:
            self._open_ended[volume] = (key.series_number, time.monotonic())
            return None
        if len(parts) < key.parts_expected:
            return None
        return self._hand_on(volume, key.series_number)

    def _close_open_ended(self) -> list[VolumeFiles]:
        """Volumes of an unknown slice count that are over: a later volume of the series began, or no
        slice came for `parts_wait_s`."""
        now_s, closed = time.monotonic(), []
        for volume, (series_number, last_part_s) in list(self._open_ended.items()):
            later = any(uid == volume[0] and index > volume[1] for uid, index in self._parts)
            if later or now_s - last_part_s >= self.parts_wait_s:
                del self._open_ended[volume]
                closed.append(self._hand_on(volume, series_number))
        return closed

    def _hand_on(self, volume: tuple[str, int], series_number: int) -> VolumeFiles:
        parts = self._parts.pop(volume)
        paths = tuple(parts[part] for part in sorted(parts))
        self._complete[volume] = paths
        self.counters["volumes"] += 1
        return VolumeFiles(volume[0], series_number, volume[1], paths, self._seen.pop(volume))
