"""Realtime: the scanner-side service (ingest, journal, incremental GLM, decoding, streaming, viewer).

Not built yet (see the open issues); it talks to simulators/ and viewers only through the wire protocol.
"""
