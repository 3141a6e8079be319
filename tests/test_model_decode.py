"""``benchmarks/model_decode.py``: the max-batch search (the largest batch that fits, found by trying), the
compression timer and the prefills timed by number of pipelined groups."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_decode import largest_fitting  # noqa: E402


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 7, 8, 9, 23, 64, 100])
def test_largest_fitting_finds_the_largest_batch_that_fits(capacity):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert largest_fitting(fits, limit=64) == min(capacity, 64)
    assert len(tried) <= 2 * 7 + 1  # doubling to 64, then bisecting: logarithmic in the limit
    assert all(1 <= b <= 64 for b in tried)


@pytest.mark.parametrize("capacity", [0, 1, 5, 6, 7, 8, 9, 12, 30, 64])
@pytest.mark.parametrize("guess", [1, 7, 8, 64, 90])
def test_a_guess_is_checked_by_trying_around_it(capacity, guess):
    """From a guess the search steps up or down and bisects: the answer never depends on the
    guess, and a right guess (capacity 7 or 8 for guess 7 or 8) costs two tries."""
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert largest_fitting(fits, limit=64, guess=guess) == min(capacity, 64)
    assert all(1 <= b <= 64 for b in tried) and len(set(tried)) == len(tried)
    if guess == capacity < 64:
        assert tried == [guess, guess + 1]
    if capacity >= 1 and guess == capacity + 1:
        assert tried == [guess, guess - 1]


def test_compression_timer_yields_every_layer_and_compares_with_the_same_work_outside(caplog):
    """The timer hands on what the compression's two steps give; profiling, it also times the
    same inputs compressed outside the model and logs both."""
    from model_decode import CompressionTimer

    from rotatek_compile import RotateKConfig
    from rotatek_compile.state import compress_layers
    from tests.test_compress_layers import assert_same_layer, prefills
    from tests.test_sinks import WINDOW

    config = RotateKConfig(query_window=WINDOW, span="prompt", key_channels=4)
    timer = CompressionTimer(profile=True)
    with caplog.at_level("INFO", logger="model_decode"):
        timed = list(timer.compress_counted(timer.count_tokens(prefills(), config)))
    for mine, theirs in zip(timed, compress_layers(prefills(), config), strict=True):
        assert_same_layer(mine, theirs)
    assert timer.seconds > 0
    assert any("on the same inputs outside it" in message for message in caplog.messages)


def test_prefills_by_pipelined_groups_alternate_and_restore_the_default():
    """Each number of groups is timed in turn within each repeat, the medians are reported, and the
    module's default is back afterwards (also when a run fails)."""
    from model_decode import COMPRESSING_MODULE, by_pipelined_groups

    default, seen = COMPRESSING_MODULE.PIPELINED_GROUPS, []

    def run():
        groups = COMPRESSING_MODULE.PIPELINED_GROUPS
        seen.append(groups)
        return {"prefill_ms": 100.0 * groups + len(seen), "compression_ms": float(groups)}

    timed = by_pipelined_groups(run, [1, 4])
    assert seen == [1, 4, 1, 4, 1, 4]
    assert timed == {1: {"prefill_ms": 103.0, "compression_ms": 1.0}, 4: {"prefill_ms": 404.0, "compression_ms": 4.0}}
    assert COMPRESSING_MODULE.PIPELINED_GROUPS == default

    def failing():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        by_pipelined_groups(failing, [8])
    assert COMPRESSING_MODULE.PIPELINED_GROUPS == default
