"""Realtime: the scanner-side service (docs/realtime.md). It talks to the scanner side and to viewers
only through the wire protocol (docs/protocol.md).

    service.py    the ingest loop: receive, journal, judge, ack, process; restart from the journal
    admission.py  the receiver rules: verdicts, in-order release of volumes, gaps, runs
    pipeline.py   each subject's ROI and the content checks; one incremental GLM per run
    glm.py        the constant-work single-trial GLM
    decoder.py    the decode thread: bounded queue, batches, results out
    backends.py   decode backends (torch now; the export backends implement the same interface)
    viewer/       the live web page (and a standalone viewer fed by the PUB socket)
    latency.py    the per-session latency log and report
    cli.py        mindeye-realtime
"""
