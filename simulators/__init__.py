"""Simulators: the synthetic NSD world and the replayer that streams runs over the wire."""
