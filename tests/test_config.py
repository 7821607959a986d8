"""Configuration precedence: flags > KVSCHED_* environment > TOML file > defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from scheduler_service import config


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p.parse_args(list(argv))


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('[serve]\nlisten = "127.0.0.1:1111"\ndata-dir = "/from/file"\ngrace_s = 9.0\n')
    env = {"KVSCHED_DATA_DIR": "/from/env", "KVSCHED_GRACE_S": "7"}
    cfg = config.resolve(parse("--config", str(f), "--grace-s", "3"), env)
    assert cfg.listen == "127.0.0.1:1111"  # file
    assert cfg.data_dir == "/from/env"  # env beats file
    assert cfg.grace_s == 3.0  # flag beats env
    assert cfg.tick_interval_s == config.ServeConfig().tick_interval_s  # default


def test_env_booleans_and_numbers_are_parsed() -> None:
    cfg = config.resolve(parse(), {"KVSCHED_LOG_JSON": "yes", "KVSCHED_METRICS_PORT": "0"})
    assert cfg.log_json is True and cfg.metrics_port == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVSCHED_METRICS_PORT": "lots"}, "metrics_port"),
        ({"KVSCHED_LOG_JSON": "maybe"}, "log_json"),
        ({"KVSCHED_LISTEN": "nohostport"}, "listen"),
        ({"KVSCHED_JOURNAL": "tape"}, "journal"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.resolve(parse(), env)
