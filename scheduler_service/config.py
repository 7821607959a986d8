"""Service configuration: flags > environment (KVSCHED_*) > TOML file > defaults."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class ServeConfig:
    """Everything ``kvsched serve`` can be told."""

    listen: str = "127.0.0.1:50051"
    data_dir: str = "./kvsched-data"
    journal: str = "sqlite"  # sqlite | memory | redis (shared, active/standby)
    redis_url: str = "redis://127.0.0.1:6379/0"
    cell: str = "default"  # Redis key namespace: one leader per cell
    lease_ttl_s: float = 2.0  # leader lease; a standby takes over within about this long
    redis_wait_replicas: int = 0  # WAIT for this many replicas on every group commit
    journal_synchronous: str = "FULL"  # FULL | NORMAL
    auth: str = "token"  # token: bearer tokens with roles | none: every caller is admin
    admin_token_file: str = ""  # bootstrap admin token read from this file (else generated)
    tls_cert: str = ""  # PEM server certificate chain; with tls_key enables TLS
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # PEM CA bundle; when set, clients must present a cert (mTLS)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    log_level: str = "info"
    log_json: bool | None = None  # None: JSON when stderr is not a terminal
    trace_console: bool = False
    max_concurrent_rpcs: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    grace_s: float = 5.0
    tick_interval_s: float = 0.25
    max_pending_appends: int = 50_000  # journal backlog past which new work is refused
    snapshot_interval_s: float = 60.0  # snapshot at most this often when anything changed
    snapshot_every_records: int = 100_000  # ... and sooner once this many records piled up
    server_id: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if ":" not in self.listen:
            raise ValueError(f"listen: expected host:port, got {self.listen!r}")
        if self.journal not in ("sqlite", "memory", "redis"):
            raise ValueError(
                f"journal: expected 'sqlite', 'memory' or 'redis', got {self.journal!r}"
            )
        if self.journal == "redis" and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(f"redis_url: expected redis://HOST:PORT/DB, got {self.redis_url!r}")
        if self.journal_synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError("journal_synchronous: expected FULL or NORMAL")
        if self.auth not in ("token", "none"):
            raise ValueError(f"auth: expected 'token' or 'none', got {self.auth!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert / tls_key: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "admin_token_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: out of range: {self.metrics_port}")
        if self.snapshot_every_records < 1:
            raise ValueError("snapshot_every_records: must be >= 1")
        for name in (
            "grace_s",
            "tick_interval_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "snapshot_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.max_concurrent_rpcs < 1 or self.max_message_bytes < 1024:
            raise ValueError("max_concurrent_rpcs / max_message_bytes: too small")


_FIELDS = {f.name: f for f in fields(ServeConfig)}


def _coerce(name: str, value: Any) -> Any:
    default = getattr(ServeConfig(), name)
    kind = type(default) if default is not None else bool
    if isinstance(value, str) and kind is not str:
        if kind is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for every setting (defaults are None so precedence can be resolved)."""
    p.add_argument("--config", help="TOML file ([serve] table or top-level keys)")
    for name in _FIELDS:
        flag = "--" + name.replace("_", "-")
        default = getattr(ServeConfig(), name)
        if isinstance(default, bool) or default is None:
            p.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, dest=name, default=None, type=type(default))


def resolve(ns: argparse.Namespace, env: dict[str, str] | None = None) -> ServeConfig:
    """Merge defaults < TOML file < KVSCHED_* environment < flags."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    path = getattr(ns, "config", None) or env.get("KVSCHED_CONFIG")
    if path:
        with Path(path).open("rb") as fh:
            doc = tomllib.load(fh)
        table = doc.get("serve", doc)
        for k, v in table.items():
            key = k.replace("-", "_")
            if key not in _FIELDS:
                raise ValueError(f"{path}: unknown setting {k!r}")
            values[key] = _coerce(key, v)
    for name in _FIELDS:
        raw = env.get("KVSCHED_" + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name in _FIELDS:
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    cfg = ServeConfig(**values)
    cfg.validate()
    return cfg
