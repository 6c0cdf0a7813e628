"""A run's trials from a BIDS events.tsv, as protocol `Event`s: what the replayer sends for a NIfTI run and
what the bridge sends for each scanner series (the stimulus computer's log)."""
from __future__ import annotations

import csv
from pathlib import Path

from mindeye.errors import FormatError
from mindeye.protocol.messages import Event


def read_bids_events(path: str | Path) -> tuple[Event, ...]:
    """`onset` and `duration` (s, >= 0) required; `image_id` (a 0-based integer or n/a) and `trial_type` (the
    label) used when present; a `trial` column numbers the trials, else row order does."""
    path = Path(path)
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    if not rows or not {"onset", "duration"} <= set(rows[0]):
        raise FormatError(path, "BIDS events file", "a header with 'onset' and 'duration' columns and >= 1 row",
                          f"columns {sorted(rows[0]) if rows else []}, {len(rows)} rows")
    events = []
    for row_number, row in enumerate(rows):
        try:
            trial = int(row["trial"]) if row.get("trial") not in (None, "", "n/a") else row_number
            onset_s, duration_s = float(row["onset"]), float(row["duration"])
            image_id = None if row.get("image_id") in (None, "", "n/a") else int(row["image_id"])
        except ValueError as error:
            raise FormatError(path, f"row {row_number + 2}", "numbers in trial, onset, duration and image_id",
                              str(error)) from None
        if onset_s < 0 or duration_s < 0:
            raise FormatError(path, f"row {row_number + 2}", "onset and duration >= 0", f"{onset_s}, {duration_s}")
        events.append(Event(trial, onset_s, duration_s, image_id, row.get("trial_type") or "event"))
    return tuple(events)
