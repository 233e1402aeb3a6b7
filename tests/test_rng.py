"""Counter-based draws (rng.py): the hash's values and statistics, and the stream table without collisions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ced_lightning.core.rng import KNOWN_OVERLAPS, STREAMS, counter_uniform, stream_id


def test_counter_uniform_range_and_determinism() -> None:
    idx = np.arange(10000)
    u = counter_uniform(1, 2, idx, 3)
    assert u.dtype == np.float64 and u.shape == (10000,)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(u, counter_uniform(1, 2, idx, 3))
    np.testing.assert_array_equal(u[[5, 77]], counter_uniform(1, 2, np.array([5, 77]), 3))
    for other in (
        counter_uniform(2, 2, idx, 3),
        counter_uniform(1, 3, idx, 3),
        counter_uniform(1, 2, idx, 4),
    ):
        assert np.mean(other == u) < 0.001
        assert abs(np.corrcoef(other, u)[0, 1]) < 0.05
    # neighbouring indices are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05


def test_counter_uniform_known_values() -> None:
    # pins the hash: stored parameters must replay across versions of this code
    u = counter_uniform(42, 0, np.array([0, 1, 2**40]), 1)
    again = counter_uniform(42, 0, np.array([0, 1, 2**40], dtype=np.uint64), 1)
    np.testing.assert_array_equal(u, again)
    assert len(set(u.tolist())) == 3


def test_counter_uniform_pinned_values() -> None:
    # the exact values this code has always drawn: stores and resumed runs replay them
    u = counter_uniform(42, 0, np.array([0, 1, 2**40]), 1)
    assert u.tolist() == [0.08680086330868775, 0.7141629867275469, 0.9482672511661921]
    crop = counter_uniform(7, 3, np.array([5, 12345]), stream_id("stream.crop"))
    assert crop.tolist() == [0.1867089789452071, 0.6698846998519863]


def test_stream_ids_are_distinct() -> None:
    """No two draws share a stream id, but the one documented overlap kept for replay."""
    overlaps = {
        frozenset({a, b})
        for (a, ra), (b, rb) in itertools.combinations(STREAMS.items(), 2)
        if set(ra) & set(rb)
    }
    assert overlaps == set(KNOWN_OVERLAPS)
    # the ids each user had before the table: renumbering one would change replayed draws
    assert [stream_id(n) for n in ("augment.shift_apply", "augment.shift_amount", "augment.gain")] == [
        1,
        2,
        3,
    ]
    assert stream_id("augment.freq_start", 3) == 0x403
    assert stream_id("losses.mixup_lambda") == 0x313C
    assert stream_id("stream.window_order", 2) == 0x5A05
    with pytest.raises(ValueError, match=r"augment\.time_width.*slots 0\.\.255"):
        stream_id("augment.time_width", 256)
