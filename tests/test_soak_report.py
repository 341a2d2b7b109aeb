"""The soak's ping accounting (e2e/soak.py): lost sequence numbers get a send time
interpolated between the replies around them, so they can be matched against fault
windows and the rekey log."""
from __future__ import annotations

from pathlib import Path

from e2e.soak import PingLog


def test_lost_pings_get_interpolated_send_times(tmp_path: Path) -> None:
    log = tmp_path / "ping.log"
    lines = ["PING 10.2.0.2 (10.2.0.2) 56(84) bytes of data."]
    for seq in (1, 2, 3, 6, 7):  # 4 and 5 lost
        lines.append(f"[{1000 + 0.2 * (seq - 1):.6f}] 64 bytes from 10.2.0.2: icmp_seq={seq} ttl=62 time=1.1 ms")
    log.write_text("\n".join(lines) + "\n")
    pl = PingLog("a", "b", log)
    sent = pl.send_times()
    assert sorted(sent) == [1, 2, 3, 4, 5, 6, 7]
    assert set(pl.replies) == {1, 2, 3, 6, 7}
    assert abs(sent[4] - 1000.6) < 1e-6 and abs(sent[5] - 1000.8) < 1e-6
    assert pl.answered_after(1001.1) and not pl.answered_after(1001.2)


def test_log_read_incrementally(tmp_path: Path) -> None:
    log = tmp_path / "ping.log"
    log.write_text("[1000.000000] 64 bytes from x: icmp_seq=1 ttl=1 time=1 ms\n")
    pl = PingLog("a", "b", log)
    assert not pl.answered_after(1000.5)
    with open(log, "a") as fh:
        fh.write("[1001.000000] 64 bytes from x: icmp_seq=6 ttl=1 time=1 ms\n")
    assert pl.answered_after(1000.5)
    assert len(pl.send_times()) == 6
