import pytest

from adl_cli.cli import main


@pytest.fixture
def run():
    """run(args, capsys) -> (exit code, stdout, stderr) of `adl ARGS` through the real entry point."""

    def _run(args, capsys):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run
