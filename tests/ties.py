"""What two lowerings of one int8 network are guaranteed to agree on, on every x86-64 CPU.

Integer accumulation is exact in every lowering, but the float epilogue that requantizes a
layer's int32 result into the next layer's codes may round differently (FMA or not, another
vector width, another fusion): at an exact rounding tie one code then differs by one. That
changes one image's later activations a little and nothing else. So logits of two lowerings are
equal except in a few rows (images), and in those rows only by a small fraction of the row's
logit range; top-1 may differ only there.
"""
import math

import numpy as np


def assert_equal_up_to_ties(got, want, *, atol: float = 1e-5, rtol: float = 1e-5,
                            max_rows: float = 0.02, row_bound: float = 0.05) -> None:
    """`got` and `want` (N, classes) equal within `atol`/`rtol` in all but at most
    max(2, ceil(max_rows * N)) rows; each other row within `row_bound` × its logit range."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    close = np.abs(got - want) <= atol + rtol * np.abs(want)
    rows = np.flatnonzero(~close.all(axis=1))
    allowed = max(2, math.ceil(max_rows * len(got)))
    assert len(rows) <= allowed, (
        f"{len(rows)} of {len(got)} rows differ (at most {allowed} may, at rounding ties); "
        f"max |diff| {np.abs(got - want).max():.3g}")
    for r in rows:
        span = float(want[r].max() - want[r].min()) or 1.0
        diff = float(np.abs(got[r] - want[r]).max())
        assert diff <= row_bound * span, (
            f"row {r} differs by {diff:.3g}, more than {row_bound} of its logit range {span:.3g}")
    top_got, top_want = got.argmax(axis=1), want.argmax(axis=1)
    assert set(np.flatnonzero(top_got != top_want)) <= set(rows)
