"""Shipper: one long-lived gRPC stream from the spool to the collector.

Batches go out in sequence order, at most `max_inflight` unacknowledged at a time. An OK
acknowledgement removes the batch from the spool; a permanent rejection (INVALID_ARGUMENT, a batch
over the size limit) moves it to the dead-letter file, since resending it would fail forever; a
retryable one (backpressure, store down), a broken stream or
an acknowledgement that does not come within `ack_timeout_s` close the stream, and after a
jittered exponential backoff everything unacknowledged is sent again. The collector's store
is idempotent on (host id, GPU UUID, window start), so a resend never doubles a figure.

No batch is resent forever: the shipper learns the collector's size limit (from the stream's
initial metadata and every acknowledgement) and splits a spooled batch over it into smaller
ones before sending; a batch the collector or its transport refuses as too large is split the
same way, and one that cannot be split (a single window) is dead-lettered with the reason. The
batches behind it never wait.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import grpc

from gpuledger.agent.spool import Spool
from gpuledger.v1 import telemetry_pb2

log = logging.getLogger(__name__)

STREAM_METHOD = "/gpuledger.v1.Telemetry/Stream"
LIMIT_HEADER = "gpuledger-max-batch-bytes"  # initial metadata of a stream: the collector's batch limit


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# WindowBatch.dropped_windows is field 9 (varint). Protobuf keeps the last value of a repeated
# scalar field, so appending it to a spooled batch at send time reports the count as of now,
# including drops that happened after the batch was encoded.
_DROPPED_TAG = bytes([(9 << 3) | 0])


_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def with_dropped(payload: bytes, dropped: int) -> bytes:
    return payload + _DROPPED_TAG + _varint(dropped) if dropped else payload


@dataclass
class ShipperStats:
    sent: int = 0
    acked: int = 0
    acked_windows: int = 0
    rejected: int = 0
    retried: int = 0
    reconnects: int = 0
    split: int = 0  # batches split because they were over the collector's limit
    last_error: str = ""


class Backoff:
    """Full-jitter exponential backoff: sleep uniformly in [0, min(max, initial * 2^n)]."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


class Shipper:
    def __init__(self, target: str, spool: Spool, *, token: str | None = None,
                 channel_credentials: grpc.ChannelCredentials | None = None, max_inflight: int = 8,
                 ack_timeout_s: float = 30.0, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 options: list | None = None) -> None:
        self.target = target
        self.spool = spool
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials = channel_credentials
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self.backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.options = (options or []) + [("grpc.max_send_message_length", 64 << 20),
                                          ("grpc.keepalive_time_ms", 30_000)]
        self.stats = ShipperStats()
        self.max_batch_bytes = 0  # the collector's limit, once learned (0: not yet known)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Shipper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpuledger-shipper", daemon=True)
            self._thread.start()
        return self

    def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop shipping; with a drain timeout, first wait for the spool to empty."""
        if drain_timeout_s > 0:
            self.drain(drain_timeout_s)
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.spool.pending_count() == 0:
                return True
            time.sleep(0.02)
        return self.spool.pending_count() == 0

    # ------------------------------------------------------------------ loop
    def _channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.insecure_channel(self.target, options=self.options)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.spool.pending_count() == 0 and not self.spool.wait(self.spool.acked_seq, 0.5):
                continue
            try:
                progressed = self._stream_once()
            except grpc.RpcError as e:
                progressed = False
                code = e.code() if hasattr(e, "code") else None
                if code != grpc.StatusCode.CANCELLED or not self._stop.is_set():
                    self.stats.last_error = f"{code}: {e.details() if hasattr(e, 'details') else e}"
                    log.warning("stream to %s ended: %s", self.target, self.stats.last_error)
            except Exception as e:  # a local fault (disk, spool): the shipper thread must outlive it
                progressed = False
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.exception("shipping failed; retrying after a backoff")
            if self._stop.is_set():
                break
            if progressed:
                self.backoff.reset()
            self.stats.reconnects += 1
            self._stop.wait(self.backoff.next())

    def _stream_once(self) -> bool:
        """Run one stream until it breaks; True if at least one batch was acknowledged."""
        inflight: deque[tuple[int, float]] = deque()
        cond = threading.Condition()
        done = threading.Event()
        progressed = False

        def requests():
            sent_upto = self.spool.acked_seq
            while not done.is_set() and not self._stop.is_set():
                with cond:
                    room = self.max_inflight - len(inflight)
                    if inflight and time.monotonic() - inflight[0][1] > self.ack_timeout_s:
                        log.warning("no acknowledgement for seq %d within %.0fs; reconnecting", inflight[0][0],
                                    self.ack_timeout_s)
                        with self._lock:
                            if self._call is not None:
                                self._call.cancel()
                        return
                recs = self.spool.pending(after_seq=sent_upto, limit=room) if room > 0 else []
                if not recs:
                    with cond:
                        cond.wait(0.05)
                    continue
                for rec in recs:
                    try:
                        payload = self.spool.read(rec)
                    except FileNotFoundError:  # its segment was just dropped (spool full): gone
                        sent_upto = rec.seq
                        continue
                    if self.max_batch_bytes and len(payload) > self.max_batch_bytes:
                        self._split(rec.seq, payload, f"{len(payload)} bytes, over the collector's limit of "
                                                      f"{self.max_batch_bytes}")
                        sent_upto = rec.seq
                        continue
                    with cond:
                        inflight.append((rec.seq, time.monotonic(), len(payload)))
                    sent_upto = rec.seq
                    self.stats.sent += 1
                    yield with_dropped(payload, self.spool.dropped_windows)

        with self._channel() as channel:
            stream = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                           response_deserializer=telemetry_pb2.Ack.FromString)
            call = stream(requests(), metadata=self.metadata)
            with self._lock:
                self._call = call
            try:
                self._learn(dict(call.initial_metadata() or ()).get(LIMIT_HEADER))
                for ack in call:
                    self._learn(ack.max_batch_bytes)
                    with cond:
                        head = inflight[0][0] if inflight else None
                        if head is None or ack.seq != head:
                            # acks come in order, one per batch: anything else is a protocol error.
                            # Acknowledge nothing; reconnect and resend from the spool.
                            self.stats.last_error = f"ack for seq {ack.seq}, expected {head}: {ack.message}"
                            log.error("collector acknowledged seq %d while %s was outstanding (%s); "
                                      "reconnecting", ack.seq, head, ack.message)
                            call.cancel()
                            break
                        inflight.popleft()
                        cond.notify_all()
                    if ack.code == 0:
                        self.spool.ack(ack.seq)
                        self.stats.acked += 1
                        self.stats.acked_windows += ack.stored_windows
                        progressed = True
                    elif not ack.retryable and ack.code == _RESOURCE_EXHAUSTED and self._split(
                            ack.seq, None, ack.message):
                        progressed = True
                    elif not ack.retryable:
                        self.stats.rejected += 1
                        self.stats.last_error = f"collector refused seq {ack.seq}: {ack.message}"
                        self.spool.dead_letter(ack.seq, ack.message)
                        progressed = True
                    else:
                        self.stats.retried += 1
                        self.stats.last_error = f"collector code {ack.code}: {ack.message}"
                        log.warning("collector deferred seq %d (%s); backing off", ack.seq, ack.message)
                        call.cancel()
                        break
            except grpc.RpcError as e:
                # the transport refused a message (over its receive limit): the largest batch in flight is
                # the culprit; learn a limit below its size so that it is split before it is sent again
                # (not the collector's stream limits, which refuse a stream with the same code and say so)
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and inflight and "larger than" in (e.details() or ""):
                    seq, _, size = max(inflight, key=lambda x: x[2])
                    limit = size // 2
                    if not self.max_batch_bytes or limit < self.max_batch_bytes:
                        self.max_batch_bytes = max(limit, 1 << 10)
                    log.warning("collector's transport refused a message (%s); seq %d (%d bytes) will be split",
                                e.details(), seq, size)
                raise
            finally:
                done.set()
                with cond:
                    cond.notify_all()
                with self._lock:
                    self._call = None
        return progressed

    def _learn(self, value) -> None:
        try:
            limit = int(value or 0)
        except ValueError:
            return
        if limit > 0 and limit != self.max_batch_bytes:
            self.max_batch_bytes = limit

    def _split(self, seq: int, payload: bytes | None, reason: str) -> bool:
        """Replace a spooled batch by smaller ones under the learned limit; False if it cannot be split
        (one window), so the caller dead-letters it."""
        from gpuledger.agent.runtime import split_payload, with_seq

        if payload is None:
            rec = next((r for r in self.spool.pending() if r.seq == seq), None)
            if rec is None:
                return False
            payload = self.spool.read(rec)
        limit = self.max_batch_bytes or max(len(payload) // 2, 1 << 10)
        if len(payload) <= limit:
            limit = len(payload) // 2
        try:
            parts = split_payload(payload, limit)
        except Exception as e:  # an unreadable spooled batch: the dead letter keeps it
            log.error("seq %d could not be split: %s", seq, e)
            parts = []
        if len(parts) <= 1:
            self.stats.rejected += 1
            self.stats.last_error = f"seq {seq} is too large and cannot be split: {reason}"
            self.spool.dead_letter(seq, f"too large and cannot be split: {reason}")
            return True
        new = self.spool.replace(seq, parts, f"split: {reason}", with_seq)
        self.stats.split += 1
        log.warning("seq %d split into %d batches (seq %s..%s): %s", seq, len(parts), new[0] if new else "-",
                    new[-1] if new else "-", reason)
        return True
