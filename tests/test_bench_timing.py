"""jaxaccel.bench.timing: interleaved timing, medians and ratios."""
import pytest

from jaxaccel.bench import timing

def test_time_interleaved_takes_turns_and_counts():
    calls = []
    works = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = timing.time_interleaved(works, warmup=1, repeats=4, round_size=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert {k: len(v.samples_ms) for k, v in out.items()} == {"a": 4, "b": 4}
    t = timing.Timing((1.0, 2.0, 3.0, 10.0))
    assert t.median_ms == 2.5 and t.min_ms == 1.0 and t.iqr_ms > 0
    with pytest.raises(ValueError, match="repeats"):
        timing.time_calls(lambda: None, warmup=0, repeats=0)
    assert timing.ratio(3.0, 0.0) is None and timing.ratio(3.0, 2.0) == 1.5


def test_vector_features_are_the_cpus_own_flags_and_named_in_every_header():
    from pathlib import Path

    from jaxaccel.bench import tables

    features = timing.vector_features().split()
    assert set(features) <= set(timing.VECTOR_FLAGS)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(next(line for line in cpuinfo.read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
        assert set(features) == {f for f in timing.VECTOR_FLAGS if f in flags}
    machine = timing.machine_info()
    header = tables.markdown_header(machine, "jaxaccel bench infer")
    assert f"vector features: {machine['vector_features'] or 'none reported'}" in header
