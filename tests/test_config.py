"""Configuration: sources and their precedence, resolution, and every refusal."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from events.errors import ConfigError
from spoolfs import config as config_mod
from spoolfs.config import CHECKOUT, DEFAULT_DATA_DIR, load_config
from spoolfs.layout import Layout
from spoolfs.spool import Spool

SPOOL_BIN = Path(sys.executable).parent / "spool"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOOL_CONFIG", raising=False)
    monkeypatch.delenv("SPOOL_DATA_DIR", raising=False)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- defaults and sources ---------------------------------------------------------


def test_defaults_without_any_source() -> None:
    config = load_config()
    assert config.data_dir == str(CHECKOUT / "var")
    assert Path(config.data_dir) == DEFAULT_DATA_DIR
    assert config.source == "(embedded defaults)"
    assert config.subspools == 16
    assert config.events.segment_bytes == 64 << 20
    assert config.node == (socket.gethostname().split(".")[0] or "localhost")


def test_node_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "mailhost7")
    assert load_config(data_dir=str(tmp_path)).node == "mailhost7"


def test_node_from_file_wins_over_host_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "mailhost7")
    cfg = write(tmp_path / "spool.toml", 'node = "mx1"\n')
    assert load_config(cfg, data_dir=str(tmp_path / "d")).node == "mx1"


def test_config_file_values(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "spool.toml",
        'node = "mx2"\nsubspools = 4\n[events]\nsegment_bytes = 8192\n',
    )
    config = load_config(cfg, data_dir=str(tmp_path / "d"))
    assert (config.node, config.subspools, config.events.segment_bytes) == ("mx2", 4, 8192)
    assert config.source == str(cfg)


def test_spool_config_env_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "env.toml", 'node = "fromenv"\nsubspools = 3\n')
    monkeypatch.setenv("SPOOL_CONFIG", str(cfg))
    config = load_config(data_dir=str(tmp_path / "d"))
    assert config.node == "fromenv"
    assert config.subspools == 3
    assert config.source == str(cfg)


def test_explicit_config_wins_over_spool_config_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPOOL_CONFIG", str(write(tmp_path / "env.toml", 'node = "fromenv"\n')))
    cfg = write(tmp_path / "arg.toml", 'node = "fromarg"\n')
    assert load_config(cfg, data_dir=str(tmp_path / "d")).node == "fromarg"


def test_data_dir_argument_overrides_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "spool.toml", 'data_dir = "from-file"\n')
    config = load_config(cfg, data_dir=str(tmp_path / "override"))
    assert config.data_dir == str((tmp_path / "override").resolve())


def test_spool_data_dir_env_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "spool.toml", 'data_dir = "from-file"\n')
    monkeypatch.setenv("SPOOL_DATA_DIR", str(tmp_path / "fromenv"))
    assert load_config(cfg).data_dir == str((tmp_path / "fromenv").resolve())
    # and the argument beats the environment
    assert load_config(cfg, data_dir=str(tmp_path / "arg")).data_dir == str((tmp_path / "arg").resolve())


def test_spool_data_dir_env_overrides_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPOOL_DATA_DIR", str(tmp_path / "fromenv"))
    assert load_config().data_dir == str((tmp_path / "fromenv").resolve())


def test_relative_data_dir_is_relative_to_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = write(tmp_path / "etc" / "spool.toml", 'data_dir = "../data/here"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(cfg)
    assert config.data_dir == str((tmp_path / "data" / "here").resolve())
    assert config.data_path == (tmp_path / "data" / "here").resolve()


def test_relative_config_path_resolves_from_its_own_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(tmp_path / "etc" / "spool.toml", 'data_dir = "var"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/spool.toml").data_dir == str((tmp_path / "etc" / "var").resolve())


def test_example_config_at_repo_root_loads(tmp_path: Path) -> None:
    example = CHECKOUT / "spool.example.toml"
    assert example.is_file()
    config = load_config(example, data_dir=str(tmp_path))
    assert config.subspools == 16
    assert config.events.segment_bytes == 67108864
    assert config.data_dir == str(tmp_path.resolve())


# --- refusals -------------------------------------------------------------------


BAD_CONFIGS = [
    pytest.param("mystery = 1\n", "mystery", "unknown key", id="unknown-top-level-key"),
    pytest.param("[events]\nbogus = 2\n", "events.bogus", "unknown key", id="unknown-events-key"),
    pytest.param('subspools = "many"\n', "subspools", "expected `int`", id="wrong-type-str"),
    pytest.param("subspools = true\n", "subspools", "expected `int`", id="wrong-type-bool"),
    pytest.param("data_dir = 5\n", "data_dir", "expected `str`", id="wrong-type-data-dir"),
    pytest.param(
        '[events]\nsegment_bytes = "big"\n', "events.segment_bytes", "expected `int`", id="wrong-type-events"
    ),
    pytest.param("events = 5\n", "events", "expected", id="events-not-a-table"),
    pytest.param("subspools = 0\n", "subspools", "between 1 and 256", id="subspools-zero"),
    pytest.param("subspools = 257\n", "subspools", "between 1 and 256", id="subspools-too-many"),
    pytest.param("subspools = -3\n", "subspools", "between 1 and 256", id="subspools-negative"),
    pytest.param("[events]\nsegment_bytes = 10\n", "events.segment_bytes", "4096", id="segment-too-small"),
    pytest.param(
        "[events]\ncheckpoint_every = 0\n", "events.checkpoint_every", "at least 1", id="checkpoint-never"
    ),
    pytest.param('node = "a b"\n', "node", "not a valid node name", id="bad-node"),
    pytest.param('source = "x"\n', "source", "unknown key", id="resolved-field-not-a-key"),
]


@pytest.mark.parametrize(("text", "key", "why"), BAD_CONFIGS)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg, data_dir=str(tmp_path / "d"))
    message = str(info.value)
    assert message.startswith(f"config error: {cfg}: {key}: "), message
    assert why in message
    assert info.value.exit_code == 2


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", "subspools = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, data_dir=str(tmp_path / "d"))
    assert str(info.value).startswith(f"config error: {cfg}: ")
    assert "line 1" in str(info.value)


def test_non_utf8_toml_is_a_config_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", b'node = "\xff"\n')
    with pytest.raises(ConfigError, match=re.escape(str(cfg))):
        load_config(cfg, data_dir=str(tmp_path / "d"))


def test_missing_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(cfg, data_dir=str(tmp_path / "d"))
    assert str(info.value) == f"config error: {cfg}: cannot read: No such file or directory"


def test_config_path_that_is_a_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, data_dir=str(tmp_path / "d"))
    assert str(info.value).startswith(f"config error: {tmp_path}: cannot read:")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_config_file_without_read_permission(tmp_path: Path) -> None:
    cfg = write(tmp_path / "secret.toml", "subspools = 4\n")
    cfg.chmod(0)
    with pytest.raises(ConfigError, match="cannot read: Permission denied"):
        load_config(cfg, data_dir=str(tmp_path / "d"))


def test_data_dir_in_file_that_is_a_file(tmp_path: Path) -> None:
    write(tmp_path / "afile", "not a directory")
    cfg = write(tmp_path / "spool.toml", 'data_dir = "afile"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value).startswith(f"config error: {cfg}: data_dir: ")
    assert "is not a directory" in str(info.value)


def test_data_dir_override_that_is_a_file(tmp_path: Path) -> None:
    target = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError, match=r"data_dir: .*afile exists and is not a directory"):
        load_config(data_dir=str(target))


def test_node_with_trailing_newline_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "spool.toml", 'node = "mx1\\n"\n')
    with pytest.raises(ConfigError, match="node"):
        load_config(cfg, data_dir=str(tmp_path / "d"))


def test_changing_subspools_of_an_existing_spool_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Layout(data, 4).create()
    assert (data / "spool" / "SUBSPOOLS").read_text().strip() == "4"
    assert sorted(
        p.name for p in (data / "spool").iterdir() if p.name not in ("tmp", "corrupt", "SUBSPOOLS")
    ) == [
        "00",
        "01",
        "02",
        "03",
    ]
    Layout(data, 4).create()  # the same count again is fine
    with pytest.raises(ConfigError, match="subspools") as info:
        Layout(data, 8).create()
    assert "4" in str(info.value) and "8" in str(info.value)
    assert (data / "spool" / "SUBSPOOLS").read_text().strip() == "4"
    assert not (data / "spool" / "04").exists()


def test_spool_open_refuses_changed_subspools(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg4 = write(tmp_path / "four.toml", "subspools = 4\n")
    cfg8 = write(tmp_path / "eight.toml", "subspools = 8\n")
    Spool.open(load_config(cfg4, data_dir=str(data))).close()
    with pytest.raises(ConfigError):
        Spool.open(load_config(cfg8, data_dir=str(data)))


# --- through the CLI ------------------------------------------------------------


def _assert_config_error_output(exit_code: int, stderr: str, source: str, key: str) -> None:
    assert exit_code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("spool: config error:"), stderr
    assert source in lines[0]
    assert key in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("mystery = 1\n", "mystery"),
        ("[events]\nbogus = 2\n", "events.bogus"),
        ('subspools = "many"\n', "subspools"),
        ("subspools = 999\n", "subspools"),
        ("subspools = = 3\n", "line 1"),
        ('data_dir = "afile"\n', "data_dir"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    write(tmp_path / "afile", "x")
    cfg = write(tmp_path / "bad.toml", text)
    # data_dir comes from the file in the last case; elsewhere never fall back on the checkout's var/
    override = [] if "data_dir" in text else ["--data-dir", str(tmp_path / "d")]
    result = CliRunner().invoke(app, ["--config", str(cfg), *override, "list"])
    _assert_config_error_output(result.exit_code, result.stderr, str(cfg), key)
    assert result.stdout == ""


def test_cli_unreadable_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "missing.toml"
    result = CliRunner().invoke(app, ["--config", str(cfg), "--data-dir", str(tmp_path / "d"), "list"])
    _assert_config_error_output(result.exit_code, result.stderr, str(cfg), "cannot read")
    assert not (tmp_path / "d").exists()


def test_cli_spool_config_env_error_exits_2(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", "mystery = 1\n")
    result = CliRunner().invoke(
        app, ["--data-dir", str(tmp_path / "d"), "events", "tail"], env={"SPOOL_CONFIG": str(cfg)}
    )
    _assert_config_error_output(result.exit_code, result.stderr, str(cfg), "mystery")


def test_cli_changed_subspools_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "d"
    Layout(data, 4).create()
    cfg = write(tmp_path / "eight.toml", "subspools = 8\n")
    result = CliRunner().invoke(app, ["--config", str(cfg), "--data-dir", str(data), "list"])
    _assert_config_error_output(result.exit_code, result.stderr, "", "subspools")


def test_cli_uses_config_file_and_data_dir(tmp_path: Path) -> None:
    cfg = write(tmp_path / "etc" / "spool.toml", 'data_dir = "../data"\nnode = "clinode"\nsubspools = 2\n')
    msg = write(tmp_path / "m.eml", b"Subject: x\r\n\r\nhi\r\n")
    result = CliRunner().invoke(
        app, ["--config", str(cfg), "enqueue", str(msg), "--from", "a@b.org", "--to", "c@d.org"]
    )
    assert result.exit_code == 0, result.stderr
    mid = result.stdout.strip().splitlines()[-1]
    data = tmp_path / "data"
    assert (data / "spool" / "SUBSPOOLS").read_text().strip() == "2"
    nn = Layout(data, 2).subspool_of(mid)
    assert (data / "spool" / nn / f"{mid}.eml").read_bytes() == msg.read_bytes()
    segment = next((data / "events").glob("*.jsonl")).read_text()
    assert '"node":"clinode"' in segment


def test_real_process_config_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.toml", "[events]\nwhat = 1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SPOOL_CONFIG", "SPOOL_DATA_DIR")}
    env["SPOOL_CONFIG"] = str(cfg)
    proc = subprocess.run(
        [str(SPOOL_BIN), "--data-dir", str(tmp_path / "d"), "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    _assert_config_error_output(proc.returncode, proc.stderr, str(cfg), "events.what")
    assert proc.stdout == ""
