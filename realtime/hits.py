"""The live top-1 hit rate: one definition for the demo, the viewers and the latency report.

A trial counts when it was decoded (it has a top-k), its seen image is known, and that image was
among the retrieval candidates (the result's `image_is_candidate`, which only the service can tell:
it alone knows its candidate bank). It is a hit when the top-1 candidate is the seen image. A trial
whose seen image is not a candidate cannot be a hit, so counting it would only measure the bank.
Results from before protocol field `image_is_candidate` (null or absent) are not countable: whether
their image was a candidate is unknown.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindeye.protocol import Result


def top1_hit(image_id: int | None, top1_image_id: int | None, image_is_candidate: bool | None) -> bool | None:
    """True / False for a countable trial (see the module docstring), None for one that is not."""
    if image_id is None or top1_image_id is None or image_is_candidate is not True:
        return None
    return top1_image_id == image_id


def result_hit(result: Result) -> bool | None:
    """`top1_hit` of a received `Result`."""
    return top1_hit(result.image_id, result.top_k[0].image_id if result.top_k else None, result.image_is_candidate)


def record_hit(record: dict) -> bool | None:
    """`top1_hit` of a result header as JSON (a results.jsonl line); without the field it is unknown."""
    top_k = record.get("top_k") or []
    return top1_hit(record.get("image_id"), top_k[0]["image_id"] if top_k else None,
                    record.get("image_is_candidate"))


@dataclass
class Top1Tally:
    """Hits among countable trials, over every trial added."""

    hits: int = 0
    countable: int = 0
    trials: int = 0

    def add(self, hit: bool | None) -> None:
        self.trials += 1
        if hit is not None:
            self.countable += 1
            self.hits += hit

    @property
    def rate(self) -> float | None:
        return self.hits / self.countable if self.countable else None

    def format(self) -> str:
        """e.g. "26.3 % (5 of 19 trials whose seen image was a candidate)"."""
        rate = "n/a" if self.rate is None else f"{100 * self.rate:.1f} %"
        return f"{rate} ({self.hits} of {self.countable} trials whose seen image was a candidate)"
