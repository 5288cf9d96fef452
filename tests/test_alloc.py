"""ExtentAllocator: first fit, coalescing, reserve; and a hypothesis test against a set-of-blocks model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from storage.alloc import ALIGN, ExtentAllocator, round_up

A = ALIGN


def _runs(a: ExtentAllocator) -> list[tuple[int, int]]:
    return list(zip(a._offsets, a._lengths))


def test_round_up():
    assert [round_up(n) for n in (0, 1, A, A + 1)] == [0, A, A, 2 * A]
    assert round_up(5, 4) == 8


def test_first_fit_and_coalescing():
    a = ExtentAllocator(8 * A)
    offs = [a.alloc(A) for _ in range(8)]
    assert offs == [i * A for i in range(8)]
    assert a.alloc(1) is None and a.free_bytes == 0 and a.largest_free() == 0
    a.free(1 * A, A)
    a.free(3 * A, A)
    assert _runs(a) == [(A, A), (3 * A, A)]
    assert a.alloc(2 * A) is None  # two free blocks, but not adjacent
    a.free(2 * A, A)  # joins both neighbours into one run
    assert _runs(a) == [(A, 3 * A)]
    assert a.alloc(2 * A) == A  # first fit
    a.free(A, 2 * A)
    a.free(0, A)  # merges with the run after it
    a.free(7 * A, A)
    a.free(6 * A, A)  # merges with the run before it... and after
    assert _runs(a) == [(0, 4 * A), (6 * A, 2 * A)]
    assert a.free_bytes == 6 * A and a.largest_free() == 4 * A


def test_sizes_round_up_to_the_alignment():
    a = ExtentAllocator(4 * A)
    assert a.alloc(1) == 0
    assert a.alloc(0) == A  # an empty extent still takes one block: every chunk has a distinct slot
    assert a.alloc(A + 1) == 2 * A
    assert a.free_bytes == 0
    a.free(2 * A, A + 1)
    assert a.free_bytes == 2 * A


def test_reserve_carves_the_middle_of_a_run():
    a = ExtentAllocator(8 * A)
    a.reserve(3 * A, 2 * A)
    assert _runs(a) == [(0, 3 * A), (5 * A, 3 * A)]
    a.reserve(0, A)
    a.reserve(7 * A, 100)
    assert _runs(a) == [(A, 2 * A), (5 * A, 2 * A)]
    assert a.free_bytes == 4 * A


@pytest.mark.parametrize("offset,nbytes", [(3 * A, A), (2 * A, 2 * A), (7 * A, 2 * A), (8 * A, A), (A + 1, 1)])
def test_reserve_rejects_used_outside_or_unaligned(offset, nbytes):
    a = ExtentAllocator(8 * A)
    a.reserve(3 * A, A)
    with pytest.raises(ValueError, match="is not free"):
        a.reserve(offset, nbytes)
    assert a.free_bytes == 7 * A


def test_size_must_be_aligned():
    with pytest.raises(ValueError, match=f"expected a multiple of {A}, got 100"):
        ExtentAllocator(100)
    empty = ExtentAllocator(0)
    assert empty.alloc(1) is None and empty.largest_free() == 0


def test_double_free_is_caught():
    a = ExtentAllocator(4 * A)
    off = a.alloc(A)
    a.free(off, A)
    with pytest.raises(AssertionError, match="double free"):
        a.free(off, A)


# -- model-based ---------------------------------------------------------------------------------------------------
NBLOCKS = 32
ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(0, 6 * A)),
                         st.tuples(st.just("free"), st.integers(0, 1000)),
                         st.tuples(st.just("reserve"), st.integers(0, NBLOCKS - 1), st.integers(1, 4 * A))),
               max_size=60)


def _first_fit(used: set[int], n: int) -> int | None:
    for start in range(NBLOCKS - n + 1):
        if all(b not in used for b in range(start, start + n)):
            return start
    return None


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_a_set_of_blocks_model(program):
    a = ExtentAllocator(NBLOCKS * A)
    used: set[int] = set()  # the model: which 4 KiB blocks are taken
    live: list[tuple[int, int]] = []  # (offset, nbytes) handed out
    for op in program:
        if op[0] == "alloc":
            n = round_up(max(op[1], 1)) // A
            expect = _first_fit(used, n)
            got = a.alloc(op[1])
            assert got == (None if expect is None else expect * A)
            if got is not None:
                used.update(range(expect, expect + n))
                live.append((got, op[1]))
        elif op[0] == "free" and live:
            off, nbytes = live.pop(op[1] % len(live))
            a.free(off, nbytes)
            used.difference_update(range(off // A, off // A + round_up(max(nbytes, 1)) // A))
        elif op[0] == "reserve":
            start, n = op[1], round_up(op[2]) // A
            fits = start + n <= NBLOCKS and not any(b in used for b in range(start, start + n))
            if fits:
                a.reserve(start * A, op[2])
                used.update(range(start, start + n))
                live.append((start * A, op[2]))
            else:
                with pytest.raises(ValueError):
                    a.reserve(start * A, op[2])
        # Invariants: free runs are sorted, aligned, non-empty, never adjacent (coalesced), and are exactly the
        # model's free blocks.
        runs = _runs(a)
        assert all(length > 0 and off % A == 0 and length % A == 0 for off, length in runs)
        assert all(o1 + l1 < o2 for (o1, l1), (o2, _) in zip(runs, runs[1:])), f"not coalesced: {runs}"
        free_blocks = {b for off, length in runs for b in range(off // A, (off + length) // A)}
        assert free_blocks == set(range(NBLOCKS)) - used
        assert a.free_bytes == (NBLOCKS - len(used)) * A
