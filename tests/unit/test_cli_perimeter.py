from pathlib import Path

import pytest

from cli.molinkd import parse_config


def test_allow_peers_flag(tmp_path: Path) -> None:
    f = tmp_path / "allow"
    f.write_text("# none yet\n")
    assert parse_config(["join", "--allow-peers", str(f)]).allow_peers == f
    assert parse_config(["join"]).allow_peers is None


def test_allow_peers_needs_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(["join", "--allow-peers", str(tmp_path / "missing")])
    assert "no such file" in capsys.readouterr().err
