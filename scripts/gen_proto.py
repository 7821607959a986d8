"""Regenerate the Python stubs for proto/kvsched/v1 into the client package.

Usage: python scripts/gen_proto.py [--out DIR]

The stubs land in clients/python/kvsched_client/_proto/ (or DIR) as
kvsched/v1/*_pb2.py, *_pb2_grpc.py and mypy-protobuf *.pyi. protoc writes
absolute imports (``from kvsched.v1 import types_pb2``); those are rewritten to
``kvsched_client._proto.kvsched.v1`` so the stubs never collide with the
top-level ``kvsched`` CLI package. Descriptor file names stay
``kvsched/v1/*.proto``, which is what reflection and other languages see.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "clients" / "python" / "kvsched_client" / "_proto"
HEADER = "# Generated from proto/kvsched/v1 by scripts/gen_proto.py. DO NOT EDIT.\n"
IMPORT_RE = re.compile(r"^(from|import) kvsched\.v1( import|\.)", re.MULTILINE)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported lazily: a dev-only dependency

    include = str(Path(protoc.__file__).parent / "_proto")
    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def _rewrite(path: Path) -> None:
    text = path.read_text()
    text = IMPORT_RE.sub(r"\1 kvsched_client._proto.kvsched.v1\2", text)
    path.write_text(HEADER + text)


def generate(out: Path) -> list[Path]:
    """Generate stubs into ``out``; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(
            [
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                *protos,
            ]
        )
        target = out / "kvsched" / "v1"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        written: list[Path] = []
        for src in sorted((Path(tmp) / "kvsched" / "v1").iterdir()):
            dst = target / src.name
            shutil.copyfile(src, dst)
            _rewrite(dst)
            written.append(dst)
    for pkg in (out, out / "kvsched", out / "kvsched" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text(HEADER)
        if init not in written:
            written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args(argv)
    files = generate(ns.out)
    print(f"wrote {len(files)} files under {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
