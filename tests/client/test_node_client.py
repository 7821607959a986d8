"""The Node.js worker (clients/node) against the real server: the contract is language-neutral."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from kvsched_client._proto.kvsched.v1 import admin_pb2, admin_pb2_grpc

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        r = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, timeout=240
        )
        if r.returncode != 0:
            pytest.skip(f"npm ci failed (offline?): {r.stderr.decode()[-300:]}")
    return exe


async def test_node_worker_streams_events_and_acks_directives(service, node: str) -> None:
    target = f"127.0.0.1:{service.port}"
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "worker.js"), "--target", target, "--worker-id", "node-0",
        "--sessions", "2", "--linger-s", "0.3",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    kinds = [x["kind"] for x in lines]
    assert kinds[0] == "welcome" and kinds[-1] == "summary"
    summary = lines[-1]
    directives = sorted((d["session_id"], d["action"], d["outcome"]) for d in summary["directives"])
    assert directives == [
        ("node-s0", "RETAIN_GPU", "DIRECTIVE_APPLIED"),
        ("node-s1", "RETAIN_GPU", "DIRECTIVE_APPLIED"),
    ]
    # everything it sent was acked: events, heartbeat, the answers to the leases
    # (which came as one ServerBatch with the ack, and went back as one WorkerBatch)
    assert summary["acked_seq"] == summary["sent_seq"] >= 3
    assert summary["server_batches"] >= 1
    async with grpc.aio.insecure_channel(target) as ch:
        stats = await admin_pb2_grpc.AdminServiceStub(ch).GetClusterStats(
            admin_pb2.GetClusterStatsRequest()
        )
    assert stats.events_total == 6 and stats.sessions_tool_wait == 2
