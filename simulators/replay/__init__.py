"""The replayer: streams NSD-layout runs, any 4D NIfTI or a recorded session journal over the wire
protocol, paced like a scanner, with deterministic fault injection and a fault log."""
from simulators.replay.faults import Faults, apply_faults
from simulators.replay.sender import Pacer, ReplaySummary, parse_speed, replay
from simulators.replay.sources import (JournalSource, NiftiSource, NSDSource, Outgoing, design_events,
                                       read_bids_events, run_messages)

__all__ = ["Faults", "JournalSource", "NSDSource", "NiftiSource", "Outgoing", "Pacer", "ReplaySummary",
           "apply_faults", "design_events", "parse_speed", "read_bids_events", "replay", "run_messages"]
