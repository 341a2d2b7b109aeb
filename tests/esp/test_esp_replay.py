"""Replay window (RFC 4303 §3.4.3, Appendix A) incl. ESN inference and an
EspSa-level proof that forged packets never move the window."""
from __future__ import annotations

import pytest

from agent.esp import EspSa, ReplayWindow
from agent.iana import EncrId
from agent.model import EspKeys
from tests.esp.esp_helpers import DetRng, ipv4_packet


def accept(w: ReplayWindow, seq: int) -> bool:
    if not w.check(seq):
        return False
    w.update(seq)
    return True


@pytest.mark.parametrize("size", [-32, 1, 31, 33, 100, 1.5, "64", True])
def test_bad_sizes(size) -> None:
    with pytest.raises(ValueError, match=f"replay window size {size!r}"):
        ReplayWindow(size)


@pytest.mark.parametrize("size", [32, 64, 128, 1024, 4096])
def test_duplicate_left_edge_and_jump(size: int) -> None:
    w = ReplayWindow(size)
    assert not w.check(0)  # seq 0 is never sent
    assert accept(w, 1) and not accept(w, 1)  # duplicate
    assert accept(w, size + 1)
    # 2..size+1 are inside the window; 1 was seen
    assert not w.check(1) and w.check(2)
    assert accept(w, 2) and not accept(w, 2)
    # far jump ahead
    assert accept(w, 10 * size)
    assert not w.check(10 * size - size)  # left of the window
    assert w.check(10 * size - size + 1)  # right edge of what the window still holds
    assert not w.check(size + 1)


def test_reordering_inside_window() -> None:
    w = ReplayWindow(64)
    order = [5, 3, 4, 1, 2, 64, 10, 63, 7, 6, 8, 9]
    assert all(accept(w, s) for s in order)
    assert not any(w.check(s) for s in order)
    assert w.check(11) and w.check(65)


def test_disabled_window_accepts_repeats_but_tracks_top() -> None:
    w = ReplayWindow(0)
    assert accept(w, 5) and accept(w, 5) and accept(w, 1)
    assert w.top == 5 and not w.check(0)


def test_check_has_no_side_effect() -> None:
    w = ReplayWindow(32)
    for s in (1, 100, 2**40):
        assert w.check(s)
    assert w.top == 0


def test_esn_inference_appendix_a() -> None:
    w = ReplayWindow(64)
    w.update((5 << 32) | 1000)
    assert w.infer_esn(1000 - 10) == (5 << 32) | 990  # case A, same subspace
    assert w.infer_esn(1000 + 10) == (5 << 32) | 1010
    assert w.infer_esn(900) == (6 << 32) | 900  # below the window: next subspace
    w2 = ReplayWindow(64)
    w2.update((5 << 32) | 10)  # case B: window spans subspaces 4 and 5
    assert w2.infer_esn(0xFFFFFFF0) == (4 << 32) | 0xFFFFFFF0
    assert w2.infer_esn(5) == (5 << 32) | 5
    assert w2.infer_esn(20) == (5 << 32) | 20
    fresh = ReplayWindow(64)  # no subspace below 0
    assert fresh.infer_esn(0xFFFFFFF0) == 0xFFFFFFF0


def test_esn_wrap_with_reordering() -> None:
    w = ReplayWindow(128)
    base = (1 << 32) - 40
    sent = list(range(base, base + 80))  # crosses 2^32
    arrival = sent[:30] + sent[50:60] + sent[30:50] + sent[60:]  # reordered across the wrap
    for s in arrival:
        full = w.infer_esn(s & 0xFFFFFFFF)
        assert full == s
        assert accept(w, full)
    for s in sent[-100:]:
        assert not w.check(w.infer_esn(s & 0xFFFFFFFF))


def gcm_pair(esn: bool = False, window: int = 64) -> tuple[EspSa, EspSa]:
    keys = EspKeys(spi=0x1000, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(20)), esn=esn)
    return EspSa(keys, rng=DetRng(), replay_window=window), EspSa(keys, rng=DetRng(), replay_window=window)


def test_forged_packet_after_jump_does_not_move_window() -> None:
    tx, rx = gcm_pair()
    esp = tx.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(300)])
    assert len(rx.decapsulate_batch(esp[:5])) == 5
    # forged far-future packet (valid-looking header, bad ICV)
    forged = esp[299][:-1] + bytes([esp[299][-1] ^ 0xFF])
    assert rx.decapsulate_batch([forged]) == []
    assert rx.replay.top == 5 and rx.counters["icv"] == 1
    # packets 6..10 still accepted: the window did not jump
    assert len(rx.decapsulate_batch(esp[5:10])) == 5
    # genuine jump, then a forgery inside the window and a replay
    assert len(rx.decapsulate_batch([esp[200]])) == 1
    inside = esp[190][:-1] + bytes([esp[190][-1] ^ 1])
    assert rx.decapsulate_batch([inside, esp[200], esp[100]]) == []
    assert rx.counters["icv"] == 2 and rx.counters["replay"] == 2
    assert len(rx.decapsulate_batch([esp[190]])) == 1  # the forgery did not mark 191 as seen


def test_esn_sa_wrap_with_reordering() -> None:
    tx, rx = gcm_pair(esn=True, window=128)
    tx.seq_out = (1 << 32) - 20
    rx.replay.update((1 << 32) - 20)
    esp = tx.encapsulate_batch([ipv4_packet(10, fill=i) for i in range(40)])
    reordered = esp[:15] + esp[25:30] + esp[15:25] + esp[30:]
    assert len(rx.decapsulate_batch(reordered)) == 40
    assert rx.replay.top == (1 << 32) + 20
    assert rx.decapsulate_batch(esp) == [] and rx.counters["replay"] == 40
