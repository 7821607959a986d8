"""The committed stubs are exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(tmp_path)
    committed = ROOT / "clients" / "python" / "kvsched_client" / "_proto"
    fresh_files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    old_files = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh_files == old_files, "stub files added or removed: run `make proto`"
    drifted = [
        str(f) for f in fresh_files if not filecmp.cmp(tmp_path / f, committed / f, shallow=False)
    ]
    assert drifted == [], f"stubs drifted from proto/: {drifted}; run `make proto`"


def test_block_hash_forms_round_trip_without_loss() -> None:
    from kvsched_client._proto.kvsched.v1 import types_pb2
    from scheduler_service.api.convert import block_hash_from_pb, block_hash_to_pb

    for value in (bytes(range(32)), 2**64 - 1, -(2**63), 0, 12345, b"\x00" * 8):
        wire = types_pb2.BlockHash.FromString(block_hash_to_pb(value).SerializeToString())
        back = block_hash_from_pb(wire, "h")
        assert back == value and type(back) is type(value)
