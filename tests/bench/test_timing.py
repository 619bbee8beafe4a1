"""alternating_medians runs every contender in turn each round, the warm-up first."""

from adl_cli.bench.timing import alternating_medians


def test_contenders_alternate_and_each_is_called_warmup_plus_rounds_times_repeats():
    calls = []
    out = alternating_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, repeats=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
