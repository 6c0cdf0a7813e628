"""The versioned wire protocol: multipart ZeroMQ messages, a JSON header then raw bytes (docs/protocol.md)."""
from mindeye.protocol.messages import (DTYPES, MESSAGE_TYPES, PROTOCOL_VERSION, RESULT_FLAGS, TIMING_STAGES, Ack,
                                       Envelope, Event, Events, Message, ProtocolError, Reason, Result, Retrieval,
                                       RunEnd, RunStart, Stamper, Verdict, Volume, decode, encode)
from mindeye.protocol.bids_events import read_bids_events
from mindeye.protocol.transport import (RESULTS_ENDPOINT, VOLUMES_ENDPOINT, CurveClient, CurveServer,
                                        InsecureEndpointError, bound_endpoint, create_keypair, load_keypair,
                                        new_subscriptions, recv, recv_frames, recv_with_peer, result_publisher,
                                        result_subscriber, send, volume_receiver, volume_sender)

__all__ = ["DTYPES", "MESSAGE_TYPES", "PROTOCOL_VERSION", "RESULTS_ENDPOINT", "RESULT_FLAGS", "TIMING_STAGES",
           "VOLUMES_ENDPOINT", "Ack", "CurveClient", "CurveServer", "Envelope", "Event", "Events",
           "InsecureEndpointError", "Message", "ProtocolError", "Reason", "Result", "Retrieval", "RunEnd", "RunStart",
           "Stamper", "Verdict", "Volume", "bound_endpoint", "create_keypair", "decode", "encode", "load_keypair",
           "new_subscriptions", "read_bids_events", "recv", "recv_frames", "recv_with_peer", "result_publisher",
           "result_subscriber", "send", "volume_receiver", "volume_sender"]
