"""Anti-replay window (RFC 4303 §3.4.3, Appendix A).

The window is a bitmap (a Python int) of ``size`` bits: bit i set means
sequence number ``top - i`` was received and authenticated. ``check`` runs
before the ICV, ``update`` only after the packet authenticated, so a
forged packet never moves the window (RFC 4303 §3.4.3).
"""
from __future__ import annotations

_HALF = 1 << 31


class ReplayWindow:
    """Bitmap replay window over 64-bit sequence numbers.

    ``size``: bits, 0 (anti-replay disabled; ``top`` is still tracked for ESN
    inference) or a positive multiple of 32; anything else -> ``ValueError``.
    """

    __slots__ = ("size", "top", "_bits", "_mask", "_w_inf")

    def __init__(self, size: int = 1024) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % 32:
            raise ValueError(f"replay window size {size!r}: must be 0 (disabled) or a positive multiple of 32")
        self.size = size
        self.top = 0  # highest authenticated sequence number (64-bit)
        self._bits = 0
        self._mask = (1 << size) - 1
        # Appendix A2.2 needs a window; with anti-replay off use half the space.
        self._w_inf = size if size else _HALF

    def check(self, seq: int) -> bool:
        """True if ``seq`` (64-bit) is new and not left of the window. Never changes state."""
        top = self.top
        if seq > top:
            return True
        if seq <= 0:
            return False  # sequence numbers start at 1 (RFC 4303 §3.3.3)
        if not self.size:
            return True
        d = top - seq
        if d >= self.size:
            return False
        return not (self._bits >> d) & 1

    def update(self, seq: int) -> None:
        """Mark ``seq`` received; call only after the packet authenticated."""
        top = self.top
        if seq > top:
            shift = seq - top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        else:
            d = top - seq
            if d < self.size:
                self._bits |= 1 << d

    def infer_esn(self, seq_low: int) -> int:
        """Full 64-bit sequence number for a received low 32 bits (RFC 4303 Appendix A2.2)."""
        top = self.top
        th = top >> 32
        tl = top & 0xFFFFFFFF
        w = self._w_inf
        if tl >= w - 1:
            # Case A: the window lies within one 2^32 subspace.
            seqh = th if seq_low >= tl - w + 1 else th + 1
        else:
            # Case B: the window spans two subspaces.
            if seq_low >= (tl - w + 1) & 0xFFFFFFFF:
                seqh = th - 1 if th else 0  # no subspace below 0
            else:
                seqh = th
        return (seqh << 32) | seq_low

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"


def check_replay_window(window: int, allow_no_replay: bool = False, field: str = "replay_window") -> int:
    """Validate a policy's anti-replay window (RFC 4303 §3.4.3, RFC 4302 §3.4.3).

    ``window``: packets, a positive multiple of 32, or 0 only together with
    ``allow_no_replay=True`` (anti-replay off is an explicit choice, never a
    default or a typo). Returns ``window``; raises ValueError naming ``field``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{field}: {window!r} is not a window size (packets, a positive multiple of 32)")
    if window == 0 and not allow_no_replay:
        raise ValueError(f"{field}: 0 turns anti-replay off; set allow_no_replay: true to accept that, "
                         f"or use a window such as 1024")
    if window % 32:
        raise ValueError(f"{field}: {window} is not a multiple of 32")
    return window
