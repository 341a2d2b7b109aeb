"""Defaults both sides use: the agent (agent.model, agent.config) and the controller
(controller.policy, controller.inventory) import them from here, so they are written once.

Pure module: constants only; imports neither ``agent`` nor ``controller``.
"""
from __future__ import annotations

# strongSwan-style proposal strings (parsed by agent.ike.proposals, checked by
# controller.proposals). Hybrid post-quantum first (RFC 9370: X25519 + ML-KEM-768 in
# IKE_INTERMEDIATE); the classical proposals after it are the fallback for peers without ML-KEM.
DEFAULT_IKE_PROPOSALS: tuple[str, ...] = (
    "aes256gcm16-prfsha384-x25519-ke1_mlkem768",
    "aes128gcm16-prfsha256-x25519",
    "aes256gcm16-prfsha256-x25519",
    "aes128gcm16-prfsha256-ecp256",
    "aes256gcm16-prfsha256-ecp256",
)
DEFAULT_ESP_PROPOSALS: tuple[str, ...] = ("aes128gcm16", "aes256gcm16")

# CHILD_SA volume lifetimes (RFC 4301 §4.4.2.1): uint64 in PeerPolicy; the smallest
# non-zero limits, below which a CHILD_SA would be rekeyed (or die) every few packets
MAX_LIFETIME_VOLUME = (1 << 64) - 1
MIN_LIFETIME_BYTES = 65536
MIN_LIFETIME_PACKETS = 100

# Time lifetimes of IKE_SAs and CHILD_SAs (seconds): 0 means no rekey; a non-zero one
# shorter than this could not finish its rekey (with retransmissions) before the SA
# expires. The agent's config and the controller's inventory both refuse shorter ones.
MIN_LIFETIME_S = 10
# Dead peer detection interval (RFC 7296 §2.4, seconds): 0 means off; a shorter one
# would send a liveness check more often than IKE retransmits, for every peer.
MIN_DPD_INTERVAL_S = 1
