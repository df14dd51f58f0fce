"""The command line tells what it does: --version, subcommands in --help, "did you mean" (issue 21)."""

from __future__ import annotations

import pytest

from deployer import __version__
from deployer.cli import SUBCOMMANDS, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"deploy {__version__}"


def test_help_lists_every_subcommand_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert any(line.strip().startswith(name + " ") for line in out.splitlines()), name
    assert "exit codes" in out


@pytest.mark.parametrize("typo,suggested", [("plna", "plan"), ("targts", "targets"), ("inspcet", "inspect")])
def test_a_mistyped_subcommand_gets_a_suggestion(typo: str, suggested: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([typo]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"did you mean `deploy {suggested}`" in err
