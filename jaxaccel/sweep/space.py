"""Building sweeps: points (dicts of dotted config keys -> values) and ways to combine them.

An experiment file's `get_sweep()` returns a list of points built with these (big_vision's
`get_hyper` style): `grid`, `seeds`, `product`, `zipit`, `concat`, and `sample` over
`uniform` / `loguniform` / `intrange` / `choice` distributions (which an experiment's
`get_search()` also uses: `sweep.search`). Pure Python; imports nothing of jaxaccel.
"""
from __future__ import annotations

import builtins
import dataclasses
import itertools
import math
from typing import Any, Iterable, Sequence

import numpy as np

Point = dict[str, Any]


def grid(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `key`."""
    values = list(values)
    if not values:
        raise ValueError(f"grid({key!r}, []): no values")
    return [{key: v} for v in values]


def seeds(n: int, *, start: int = 0, key: str = "seed") -> list[Point]:
    """`n` seed repeats (seed = start .. start+n-1); results group over them (mean ± std)."""
    if n <= 0:
        raise ValueError(f"seeds(n={n}): n must be positive")
    return grid(key, range(start, start + n))


def _merge(points: Sequence[Point]) -> Point:
    out: Point = {}
    for p in points:
        clash = set(out) & set(p)
        if clash:
            raise ValueError(f"sweep key {sorted(clash)[0]!r} is set twice in one point")
        out.update(p)
    return out


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of the sweeps' points (the first sweep varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Point]) -> list[Point]:
    """Point i of every sweep merged into one point; the sweeps must have equal lengths."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zipit: sweeps have different lengths {sorted(lengths)}")
    return [_merge(combo) for combo in builtins.zip(*sweeps)]


def concat(*sweeps: Sequence[Point]) -> list[Point]:
    """The points of every sweep, one list after the other."""
    return [dict(p) for s in sweeps for p in s]


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A random value for `sample` (and a searched key of `get_search()`): uniform,
    log-uniform, an integer range or a choice among values."""
    kind: str  # "uniform", "loguniform", "intrange" or "choice"
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()
    digits: int = 3
    step: int = 1      # intrange: low, low + step, ..., high
    log: bool = False  # intrange: log-uniform over the range

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "intrange":
            if self.log:
                x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
                return int(min(math.floor(x), self.high))
            return int(self.low + self.step * rng.integers((self.high - self.low) // self.step + 1))
        if self.kind == "uniform":
            x = rng.uniform(self.low, self.high)
        else:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return float(f"{x:.{self.digits}g}")  # short, readable point names


def uniform(low: float, high: float, *, digits: int = 3) -> Distribution:
    """Uniform in [low, high], rounded to `digits` significant digits."""
    if not low < high:
        raise ValueError(f"uniform({low}, {high}): need low < high")
    return Distribution("uniform", float(low), float(high), digits=digits)


def loguniform(low: float, high: float, *, digits: int = 3) -> Distribution:
    """Log-uniform in [low, high] (both > 0), e.g. learning rates."""
    if not 0 < low < high:
        raise ValueError(f"loguniform({low}, {high}): need 0 < low < high")
    return Distribution("loguniform", float(low), float(high), digits=digits)


def intrange(low: int, high: int, *, step: int = 1, log: bool = False) -> Distribution:
    """An integer in low, low + step, ..., high (both ends included); `log`: log-uniform
    (step 1, low >= 1), e.g. widths or step counts."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (low, high, step)):
        raise ValueError(f"intrange({low!r}, {high!r}, step={step!r}): need integers")
    if not low < high or step < 1 or (high - low) % step:
        raise ValueError(f"intrange({low}, {high}, step={step}): need low < high, step >= 1 "
                         f"and high - low a multiple of step")
    if log and (low < 1 or step != 1):
        raise ValueError(f"intrange({low}, {high}, step={step}, log=True): need low >= 1 "
                         f"and step 1")
    return Distribution("intrange", low, high, step=step, log=bool(log))


def choice(values: Iterable[Any]) -> Distribution:
    """One of `values`, uniformly."""
    values = tuple(values)
    if not values:
        raise ValueError("choice([]): no values")
    return Distribution("choice", values=values)


def sample(space: dict[str, Distribution | Sequence[Any]], n: int, *,
           seed: int = 0) -> list[Point]:
    """`n` random points; each key draws from its Distribution (a list means `choice`).

    Deterministic in `seed`, so a re-run of the sweep finds the same points.
    """
    if n <= 0:
        raise ValueError(f"sample(n={n}): n must be positive")
    dists = {k: d if isinstance(d, Distribution) else choice(d) for k, d in space.items()}
    rng = np.random.default_rng(seed)
    return [{k: d.draw(rng) for k, d in dists.items()} for _ in range(n)]
