"""Append-only on-disk queue of encoded batches, removed only once acknowledged.

Layout of a spool directory:
  NNNNNNNNNNNNNNNNNNNN.seg   segments named by their first sequence number; each record is a
                             24-byte header (magic, payload length, seq, windows, crc32) + payload
  state.json                 acknowledged-through seq, next seq, dropped-window count, epoch
  deadletter.log             batches the collector rejected as invalid, with the reason

A crash mid-append leaves a torn record at a segment's tail; opening the spool cuts it off.
When the spool would exceed `max_bytes` (or the disk is full), the oldest unacknowledged
segments are dropped first and every window in them is counted in `dropped_windows`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"GLS1"
HEADER = struct.Struct("<4sIQII")  # magic, length, seq, n_windows, crc32


@dataclass
class Record:
    seq: int
    n_windows: int
    segment: Path
    offset: int
    length: int


def _private(path, flags: int) -> int:
    """Opener for every spool file: readable and writable by the agent's user only (0600)."""
    return os.open(path, flags, 0o600)


class SpoolFull(OSError):
    pass


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int = 1 << 30, segment_bytes: int = 8 << 20,
                 fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # windows name hosts, processes and tags
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(min(segment_bytes, max(self.max_bytes // 4, 4096)))
        self.fsync = fsync
        self._lock = threading.Condition()
        self._records: list[Record] = []  # unacknowledged, in seq order
        self._state_path = self.dir / "state.json"
        state = self._read_state()
        self.acked_seq = int(state.get("acked_seq", 0))
        self.next_seq = int(state.get("next_seq", 1))
        self.dropped_windows = int(state.get("dropped_windows", 0))
        self.dead_lettered = int(state.get("dead_lettered", 0))
        # per GPU UUID: the earliest window ever closed, and the end of the newest one
        self.first_windows: dict[str, int] = dict(state.get("first_windows", {}))
        self.closed_until_ms = int(state.get("closed_until_ms", 0))
        # the current (or last) agent run: when it began watching, and when it stopped on purpose
        # (0: it did not stop on purpose - it is running, or it was killed)
        self.session_start_ms = int(state.get("session_start_ms", 0))
        self.stopped_ms = int(state.get("stopped_ms", 0))
        self.epoch = int(state.get("epoch", 0)) + 1  # every open is a new agent epoch
        self.torn_bytes = 0
        self._state_dirty = False
        self._active: Path | None = None
        self._active_fh = None
        self._recover()
        self._write_state()

    # ------------------------------------------------------------------ recovery
    def _read_state(self) -> dict:
        try:
            return json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("spool state %s unreadable (%s); starting from the segments", self._state_path, e)
            return {}

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.seg"))

    def _recover(self) -> None:
        for seg in self._segments():
            data = seg.read_bytes()
            off = 0
            good_end = 0
            while off + HEADER.size <= len(data):
                magic, length, seq, n_win, crc = HEADER.unpack_from(data, off)
                end = off + HEADER.size + length
                if magic != MAGIC or end > len(data) or zlib.crc32(data[off + HEADER.size:end]) != crc:
                    break
                if seq > self.acked_seq:
                    self._records.append(Record(seq, n_win, seg, off + HEADER.size, length))
                self.next_seq = max(self.next_seq, seq + 1)
                off = good_end = end
            if good_end < len(data):
                self.torn_bytes += len(data) - good_end
                log.warning("spool segment %s: cut %d torn bytes at offset %d", seg.name, len(data) - good_end, good_end)
                with open(seg, "r+b") as fh:
                    fh.truncate(good_end)
            if good_end == 0:
                seg.unlink()
        self._gc()

    # ------------------------------------------------------------------ writing
    def note_windows(self, uuids, start_ms: int, end_ms: int) -> None:
        """Remember, per GPU, the earliest window ever closed, and where closing reached (persisted
        with the next append): a restarted agent starts after it instead of re-emitting a window."""
        for u in uuids:
            if u not in self.first_windows or start_ms < self.first_windows[u]:
                self.first_windows[u] = int(start_ms)
                self._state_dirty = True
        if end_ms > self.closed_until_ms:
            self.closed_until_ms = int(end_ms)
            self._state_dirty = True

    def begin_session(self, start_ms: int) -> None:
        """A new agent run begins watching at `start_ms`; it has not stopped (persisted now)."""
        with self._lock:
            self.session_start_ms = int(start_ms)
            self.stopped_ms = 0
            self._write_state()

    def mark_stopped(self, at_ms: int) -> None:
        """The run stopped on purpose at `at_ms` (its stop batch is spooled): persisted now."""
        with self._lock:
            self.stopped_ms = int(at_ms)
            self._write_state()

    def replace(self, seq: int, parts: list[tuple[bytes, int]], reason: str, renumber) -> list[int]:
        """Replace one unacknowledged batch by several smaller ones (each (payload, windows)), appended with
        new sequence numbers (`renumber(payload, seq) -> payload`); the original is dropped and the reason
        logged in deadletter.log (without its payload: nothing of it is lost). Returns the new numbers."""
        with self._lock:
            rec = next((r for r in self._records if r.seq == seq), None)
            if rec is None:
                return []
            new = [self.append(renumber(payload, self.next_seq), n, seq=self.next_seq) for payload, n in parts]
            self._log_dead(seq, rec.n_windows, f"{reason}; replaced by seq {new[0]}..{new[-1]}" if new else reason,
                           b"")
            self._records = [r for r in self._records if r.seq != seq]
            if self._records and self._records[0].seq > seq:
                self.acked_seq = max(self.acked_seq, seq)  # done with: not reloaded after a restart
            self._write_state()
            self._gc()
            self._lock.notify_all()
            return new

    def _log_dead(self, seq: int, windows: int, reason: str, payload: bytes) -> None:
        with open(self.dir / "deadletter.log", "ab", opener=_private) as fh:
            meta = json.dumps({"seq": seq, "windows": windows, "reason": reason}).encode()
            fh.write(struct.pack("<II", len(meta), len(payload)) + meta + payload)
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, payload: bytes, n_windows: int, seq: int | None = None) -> int:
        """Durably append one encoded batch; returns its sequence number."""
        with self._lock:
            seq = self.next_seq if seq is None else seq
            rec_len = HEADER.size + len(payload)
            if rec_len > self.max_bytes:
                raise SpoolFull(errno.EFBIG, f"batch of {rec_len} bytes exceeds spool.max_bytes={self.max_bytes}")
            while self.bytes_used() + rec_len > self.max_bytes and self._drop_oldest():
                pass
            header = HEADER.pack(MAGIC, len(payload), seq, n_windows, zlib.crc32(payload))
            for attempt in range(3):
                try:
                    seg, off = self._write(header + payload)
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt == 2:
                        raise
                    log.error("spool disk full; dropping the oldest unacknowledged windows")
                    if not self._drop_oldest():
                        self.dropped_windows += n_windows
                        self.next_seq = seq + 1
                        self._write_state()
                        raise SpoolFull(e.errno, "spool disk full and nothing left to drop") from e
            self._records.append(Record(seq, n_windows, seg, off + HEADER.size, len(payload)))
            self.next_seq = seq + 1
            if self._state_dirty:
                self._write_state()
            self._lock.notify_all()
            return seq

    def _write(self, blob: bytes) -> tuple[Path, int]:
        if self._active_fh is None or self._active_fh.tell() + len(blob) > self.segment_bytes:
            self._roll()
        fh = self._active_fh
        off = fh.tell()
        try:
            fh.write(blob)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        except OSError:
            fh.truncate(off)
            fh.seek(off)
            raise
        return self._active, off

    def _roll(self) -> None:
        if self._active_fh is not None:
            self._active_fh.close()
        self._active = self.dir / f"{self.next_seq:020d}.seg"
        self._active_fh = open(self._active, "ab", opener=_private)
        self._active_fh.seek(0, os.SEEK_END)

    def _drop_oldest(self, write_state: bool = True) -> bool:
        """Drop the oldest segment holding unacknowledged records (not the one being written)."""
        segs = [s for s in self._segments() if s != self._active]
        if not segs:
            if self._active_fh is None or not self._records:
                return False
            # only the active segment is left: drop it whole and start a fresh one
            self._active_fh.close()
            self._active_fh = None
            segs = [self._active]
        victim = segs[0]
        lost = [r for r in self._records if r.segment == victim]
        self._records = [r for r in self._records if r.segment != victim]
        self.dropped_windows += sum(r.n_windows for r in lost)
        if lost:
            log.error("spool over its limit: dropped %d batches (%d windows), seq %d..%d", len(lost),
                      sum(r.n_windows for r in lost), lost[0].seq, lost[-1].seq)
        victim.unlink(missing_ok=True)
        if write_state:
            self._write_state()
        return True

    # ------------------------------------------------------------------ reading / acking
    def read(self, rec: Record) -> bytes:
        with open(rec.segment, "rb") as fh:
            fh.seek(rec.offset)
            return fh.read(rec.length)

    def pending(self, after_seq: int = 0, limit: int | None = None) -> list[Record]:
        with self._lock:
            out = [r for r in self._records if r.seq > after_seq]
            return out if limit is None else out[:limit]

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Wait until a record after `after_seq` exists; True if one does."""
        with self._lock:
            return self._lock.wait_for(lambda: any(r.seq > after_seq for r in self._records), timeout)

    def ack(self, seq: int) -> None:
        with self._lock:
            self._records = [r for r in self._records if r.seq > seq]
            self.acked_seq = max(self.acked_seq, seq)
            self._write_state()
            self._gc()
            self._lock.notify_all()

    def dead_letter(self, seq: int, reason: str) -> None:
        """Move one batch the collector refused for good to deadletter.log; it is never sent again."""
        with self._lock:
            rec = next((r for r in self._records if r.seq == seq), None)
            if rec is None:
                log.error("collector rejected batch seq=%d, which is not in the spool: %s", seq, reason)
                return
            self._log_dead(seq, rec.n_windows, reason, self.read(rec))
            self.dead_lettered += 1
            log.error("collector rejected batch seq=%d permanently: %s (moved to deadletter.log)", seq, reason)
            self._records = [r for r in self._records if r.seq != seq]
            if not self._records or self._records[0].seq > seq:
                self.acked_seq = max(self.acked_seq, seq)  # done with: not reloaded after a restart
            self._write_state()
            self._gc()
            self._lock.notify_all()

    def _gc(self) -> None:
        live = {r.segment for r in self._records}
        for seg in self._segments():
            if seg not in live and not (self._active_fh is not None and seg == self._active):
                seg.unlink(missing_ok=True)

    def _write_state(self) -> None:
        """Replace state.json atomically. On a full disk, drop the oldest windows once (their space is
        ours to reclaim) and try again; if the disk is still full (other files fill it), keep the
        state in memory, marked dirty, and write it at the next chance: never raise to the caller."""
        for attempt in range(2):
            try:
                self._write_state_once()
                return
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if attempt == 0 and len(self._segments()) > 1 and self._drop_oldest(write_state=False):
                    continue
                self._state_dirty = True
                log.error("spool state not written (%s); kept in memory, retried on the next change", e)
                return

    def _write_state_once(self) -> None:
        self._state_dirty = False
        tmp = self._state_path.with_suffix(".tmp")
        with open(tmp, "w", opener=_private) as fh:
            fh.write(json.dumps({"acked_seq": self.acked_seq, "next_seq": self.next_seq,
                                 "dropped_windows": self.dropped_windows, "dead_lettered": self.dead_lettered,
                                 "epoch": self.epoch, "first_windows": self.first_windows,
                                 "closed_until_ms": self.closed_until_ms,
                                 "session_start_ms": self.session_start_ms, "stopped_ms": self.stopped_ms}))
        os.replace(tmp, self._state_path)

    # ------------------------------------------------------------------ stats
    def bytes_used(self) -> int:
        return sum(s.stat().st_size for s in self._segments())

    def pending_windows(self) -> int:
        with self._lock:
            return sum(r.n_windows for r in self._records)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._records)

    def close(self) -> None:
        with self._lock:
            if self._active_fh is not None:
                self._active_fh.close()
                self._active_fh = None
            self._write_state()
