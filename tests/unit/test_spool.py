"""Spool: durable append, ack, recovery of a torn tail, dead letters, size limit."""

from __future__ import annotations

import json
import struct

from gpuledger.agent.spool import HEADER, Spool


def test_append_ack_and_reopen(tmp_path):
    s = Spool(tmp_path, fsync=False)
    seqs = [s.append(f"batch-{i}".encode(), n_windows=10) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    s.ack(2)
    assert [r.seq for r in s.pending()] == [3, 4, 5]
    epoch = s.epoch
    s.close()
    s2 = Spool(tmp_path, fsync=False)
    assert s2.epoch == epoch + 1
    assert [(r.seq, s2.read(r)) for r in s2.pending()] == [(3, b"batch-2"), (4, b"batch-3"), (5, b"batch-4")]
    assert s2.append(b"next", 1) == 6  # sequence numbers are never reused


def test_torn_tail_is_cut_and_earlier_records_survive(tmp_path):
    s = Spool(tmp_path, fsync=False)
    s.append(b"a" * 100, 1)
    s.append(b"b" * 100, 1)
    s.close()
    seg = sorted(tmp_path.glob("*.seg"))[0]
    with open(seg, "ab") as fh:  # a crash in the middle of a third append
        fh.write(HEADER.pack(b"GLS1", 100, 3, 1, 0) + b"c" * 40)
    s2 = Spool(tmp_path, fsync=False)
    assert [s2.read(r) for r in s2.pending()] == [b"a" * 100, b"b" * 100]
    assert s2.torn_bytes == HEADER.size + 40
    assert s2.append(b"d", 1) == 3


def test_corrupt_record_is_detected_by_checksum(tmp_path):
    s = Spool(tmp_path, fsync=False)
    s.append(b"x" * 50, 1)
    s.append(b"y" * 50, 1)
    s.close()
    seg = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(seg.read_bytes())
    data[HEADER.size * 2 + 50 + 10] ^= 0xFF  # flip a byte in the second payload
    seg.write_bytes(bytes(data))
    s2 = Spool(tmp_path, fsync=False)
    assert [s2.read(r) for r in s2.pending()] == [b"x" * 50]


def test_dead_letter_keeps_payload_and_reason(tmp_path):
    s = Spool(tmp_path, fsync=False)
    s.append(b"bad", 3)
    s.append(b"good", 2)
    s.dead_letter(1, "gpu_windows.util_max_pct: 101 exceeds 100 at row 0")
    assert [r.seq for r in s.pending()] == [2]
    raw = (tmp_path / "deadletter.log").read_bytes()
    mlen, plen = struct.unpack_from("<II", raw)
    meta = json.loads(raw[8:8 + mlen])
    assert meta == {"seq": 1, "windows": 3, "reason": "gpu_windows.util_max_pct: 101 exceeds 100 at row 0"}
    assert raw[8 + mlen:8 + mlen + plen] == b"bad"
    assert s.dead_lettered == 1


def test_size_limit_drops_oldest_and_counts_windows(tmp_path):
    s = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=16 * 1024, fsync=False)
    payload = b"z" * 4000
    for _ in range(40):  # 160 kB into a 64 kB spool
        s.append(payload, n_windows=8)
    assert s.bytes_used() <= 64 * 1024
    kept = s.pending_count()
    assert s.dropped_windows == (40 - kept) * 8
    assert s.dropped_windows > 0
    assert [r.seq for r in s.pending()][-1] == 40  # the newest are kept
    s.close()
    assert Spool(tmp_path, fsync=False).dropped_windows == s.dropped_windows  # persisted


def test_acked_segments_are_deleted(tmp_path):
    s = Spool(tmp_path, segment_bytes=4096, fsync=False)
    for _ in range(20):
        s.append(b"q" * 1000, 1)
    assert len(list(tmp_path.glob("*.seg"))) > 3
    s.ack(20)
    assert s.pending_count() == 0
    assert len(list(tmp_path.glob("*.seg"))) <= 1
