"""ESP/AH core (pure): transforms, EspSa, AhSa, replay window, SAD, SPD,
RFC 3948 helpers; packet/ICMP helpers in agent.esp.packet / agent.esp.icmp.

No I/O: randomness comes from an injected ``rng(n) -> bytes``; no clock.
"""
from agent.esp.ah import AhSa
from agent.esp.errors import EspError
from agent.esp.replay import ReplayWindow, check_replay_window
from agent.esp.sa import COUNTER_NAMES, DROP_REASONS, EspSa
from agent.esp.sad import ChildEntry, Sad
from agent.esp.spd import Action, Spd, SpdEntry, bypass_entries, parse_selectors
from agent.esp.transforms import make_transform
from agent.esp.udpencap import add_non_esp_marker, classify_udp4500, strip_non_esp_marker

__all__ = [
    "EspError", "EspSa", "ReplayWindow", "Sad", "ChildEntry", "Spd", "SpdEntry", "Action",
    "parse_selectors", "make_transform", "COUNTER_NAMES", "DROP_REASONS",
    "classify_udp4500", "add_non_esp_marker", "strip_non_esp_marker",
    "AhSa", "check_replay_window", "bypass_entries",
]
