"""One top-1 hit-rate definition (realtime.hits) for the demo, the viewers and the latency report."""
from __future__ import annotations

from mindeye.protocol import Envelope, Result, Retrieval
from realtime.hits import Top1Tally, record_hit, result_hit, top1_hit


def test_a_trial_counts_only_when_decoded_with_a_known_seen_image_that_was_a_candidate():
    assert top1_hit(7, 7, True) is True
    assert top1_hit(7, 3, True) is False
    assert top1_hit(7, 7, False) is None  # not a candidate: could not be a hit
    assert top1_hit(7, 7, None) is None  # unknown (an older service)
    assert top1_hit(None, 7, True) is None  # seen image unknown
    assert top1_hit(7, None, True) is None  # not decoded: no top-k


def test_results_and_results_jsonl_lines_agree():
    result = Result("s", 1, 0, 7, 9, 30.0, (Retrieval(7, 0.5), Retrieval(2, 0.4)), {}, (), Envelope("test", 0, 0.0),
                    image_is_candidate=True)
    record = {"image_id": 7, "image_is_candidate": True, "top_k": [{"image_id": 7, "score": 0.5}]}
    assert result_hit(result) is True and record_hit(record) is True
    old_record = {"image_id": 7, "top_k": [{"image_id": 7, "score": 0.5}]}  # written before the field existed
    assert record_hit(old_record) is None


def test_tally_says_what_it_counts():
    tally = Top1Tally()
    for hit in [True] * 5 + [False] * 14 + [None] * 71:
        tally.add(hit)
    assert (tally.hits, tally.countable, tally.trials) == (5, 19, 90)
    assert tally.format() == "26.3 % (5 of 19 trials whose seen image was a candidate)"
    assert Top1Tally().format() == "n/a (0 of 0 trials whose seen image was a candidate)"
