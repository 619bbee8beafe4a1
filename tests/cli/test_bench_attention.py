"""adl bench-attention: JSON rows with the documented keys; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest

from adl_cli.cli import main


def test_bench_attention_writes_rows(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "fig.png"
    main(["bench-attention", "--impl", "naive,flash", "--seq", "64,128", "--heads", "2", "--head-dim", "16",
          "--repeats", "1", "--json", str(out), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["naive", "flash", "naive", "flash"]
    for r in rows:
        for key in ("impl", "seq", "fwd_ms", "fwdbwd_ms", "peak_mb", "max_err", "ratio_sdpa"):
            assert key in r
        assert r["seq"] in (64, 128) and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_mb"] > 0
        assert r["max_err"] < 1e-5
    assert "attention at T=64" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--impl", "flsh"], "did you mean 'flash'"),
    (["--seq", "0"], "positive"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bench_attention_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench-attention", "--seq", "16", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
