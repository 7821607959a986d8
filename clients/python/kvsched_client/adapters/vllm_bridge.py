"""`kvsched-bridge vllm`: vLLM's ZMQ KV events forwarded as `KvEventBatch` messages.

vLLM publishes each batch as a multipart message (topic, 8-byte big-endian seq,
msgpack payload) on a PUB socket, and keeps recent batches for replay on an
optional ROUTER socket: send (b"", start seq) and it answers one (seq, payload)
per kept batch, then (-1, b""). The bridge asks for a replay whenever it sees a
gap in the seqs, so a slow subscriber loses nothing the publisher still holds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.adapters.vllm_events import KvEventDecodeError, decode_kv_events
from kvsched_client.pool_api import DirectiveResult

__all__ = ["BridgeStats", "EventsOnlyPool", "KvEventBridge", "main"]

log = logging.getLogger(__name__)

_END_SEQ = -1


class BridgeStats:
    """Counters since the bridge started."""

    __slots__ = ("duplicates", "forwarded", "gaps", "lost", "replayed", "undecodable")

    def __init__(self) -> None:
        self.forwarded = self.replayed = self.duplicates = 0
        self.gaps = self.lost = self.undecodable = 0


class KvEventBridge:
    """Subscribes to one vLLM publisher (one DP rank) and hands each batch to `sink`."""

    def __init__(
        self,
        endpoint: str,
        sink: Callable[[types_pb2.KvEventBatch], None],
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        replay_timeout_s: float = 1.0,
        context: Any = None,
    ) -> None:
        import zmq  # the optional extra: pip install 'kvsched-client[vllm]'

        self._zmq = zmq
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._replay = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.connect(replay_endpoint)
        self._sink = sink
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self.last_seq: int | None = None
        self.stats = BridgeStats()

    def poll(self, timeout_s: float) -> int:
        """Forwards what arrives within `timeout_s`; returns how many batches went."""
        before = self.stats.forwarded
        if self._sub.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frames = self._sub.recv_multipart(self._zmq.NOBLOCK)
                except self._zmq.Again:
                    break
                if len(frames) != 3:
                    continue
                _topic, seq_bytes, payload = frames
                self._on_batch(int.from_bytes(seq_bytes, "big", signed=True), payload, live=True)
        return self.stats.forwarded - before

    def run(self, stop: threading.Event, poll_s: float = 0.1) -> None:
        """Forwards batches until `stop` is set."""
        while not stop.is_set():
            self.poll(poll_s)

    def close(self) -> None:
        """Closes the sockets."""
        self._sub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _on_batch(self, seq: int, payload: bytes, live: bool) -> None:
        if self.last_seq is not None and seq <= self.last_seq:
            self.stats.duplicates += 1  # already forwarded (a replay overlapped the feed)
            return
        if live and self.last_seq is not None and seq > self.last_seq + 1:
            self.stats.gaps += 1
            self._request_replay(self.last_seq + 1, seq)
            if seq <= self.last_seq:
                return
            if seq > self.last_seq + 1:
                self.stats.lost += seq - self.last_seq - 1  # no longer held by vLLM
        try:
            batch = decode_kv_events(payload)
        except KvEventDecodeError as exc:
            self.stats.undecodable += 1
            log.warning("undecodable vLLM KV event batch seq=%d: %s", seq, exc)
        else:
            self._sink(batch)
            self.stats.forwarded += 1
            if not live:
                self.stats.replayed += 1
        self.last_seq = seq

    def _request_replay(self, start_seq: int, upto_seq: int) -> None:
        if self._replay is None:
            return
        self._replay.send_multipart((b"", start_seq.to_bytes(8, "big")))
        while self._replay.poll(self._replay_timeout_ms):
            frames = self._replay.recv_multipart()
            if len(frames) != 3:
                continue
            _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == _END_SEQ:
                return
            if seq < upto_seq:
                self._on_batch(seq, payload, live=False)
        log.warning("vLLM replay socket did not finish within %d ms", self._replay_timeout_ms)


class EventsOnlyPool:
    """The KVPool of a stream that only bridges KV events: it enforces nothing."""

    def __init__(self, spec: types_pb2.CacheSpec) -> None:
        self._spec = spec

    def cache_spec(self) -> types_pb2.CacheSpec:
        """Returns the declared cache."""
        return self._spec

    def apply_directive(
        self, directive: worker_pb2.RetentionDirective, now: float
    ) -> DirectiveResult:
        """Rejects: retention is enforced by the engine's connector, not the bridge."""
        return DirectiveResult.rejected("this stream only bridges KV events")

    def expire_leases(self, now: float) -> int:
        """Returns 0: the bridge holds no leases."""
        return 0

    def snapshot(self, now: float) -> worker_pb2.PoolSnapshot:
        """Returns an incomplete, empty snapshot (the bridge does not know residency)."""
        return worker_pb2.PoolSnapshot(complete=False)

    def heartbeat(self, now: float) -> worker_pb2.Heartbeat:
        """Returns an empty heartbeat."""
        return worker_pb2.Heartbeat()

    def take_kv_events(self) -> list[types_pb2.KvEvent]:
        """Returns nothing: bridged batches go straight to the stream."""
        return []


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvsched-bridge", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="engine", required=True)
    v = sub.add_parser("vllm", help="bridge vLLM KV events (ZMQ) to kvsched")
    v.add_argument("--zmq", required=True, help="vLLM PUB endpoint, e.g. tcp://HOST:5557")
    v.add_argument("--replay", default=None, help="vLLM replay endpoint, e.g. tcp://HOST:5558")
    v.add_argument("--topic", default="")
    v.add_argument("--target", required=True, help="kvsched address HOST:PORT")
    v.add_argument("--worker-id", required=True)
    v.add_argument("--token-file", default="", help="file holding a worker-role bearer token")
    v.add_argument("--epoch", type=int, default=0, help="0 = derived from the start time")
    v.add_argument("--dp-rank", type=int, default=0)
    v.add_argument("--endpoint", default="", help="router-facing address of the replica")
    v.add_argument("--model", default="")
    v.add_argument("--block-size", type=int, default=16)
    v.add_argument("--gpu-blocks", type=int, default=1)
    v.add_argument("--bytes-per-token", type=int, default=131_072)
    v.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0)
    v.add_argument(
        "--kv-transfer-domain",
        default="",
        help="replicas declaring the same domain can load each other's KV"
        " (a shared LMCache store, NIXL); empty = none",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvsched-bridge`; returns the exit code."""
    from kvsched_client.worker import SyncWorkerClient

    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO)
    spec = types_pb2.CacheSpec(
        block_size_tokens=args.block_size,
        bytes_per_token=args.bytes_per_token,
        gpu_capacity_blocks=args.gpu_blocks,
        hash_algo="sha256",
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        kv_transfer_domain=args.kv_transfer_domain,
    )
    hello = worker_pb2.Hello(
        worker_id=args.worker_id,
        epoch=args.epoch or int(time.time()),
        dp_rank=args.dp_rank,
        endpoint=args.endpoint,
        engine_name="vllm",
        model=args.model,
    )
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    client = SyncWorkerClient(
        args.target, hello, EventsOnlyPool(spec), collect_pool_events=False, token=token
    )
    client.start()
    bridge = KvEventBridge(
        args.zmq, client.report_kv_events, replay_endpoint=args.replay, topic=args.topic
    )
    stop = threading.Event()
    try:
        bridge.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        bridge.close()
        client.stop()
    return 0
