"""The Jigsaw permutation set: Noroozi and Favaro (ECCV 2016), Section 3.2 and Algorithm 1.

Of the 9! = 362,880 orderings of a 3x3 puzzle the network classifies a subset chosen greedily
for large Hamming distances (the number of tiles that land in a different place): start from
a uniformly drawn permutation, then repeatedly add the remaining permutation whose summed
Hamming distance to the permutations already chosen is largest (Algorithm 1, line 9:
D_bar = 1^T D, i.e. the column sums of the |P| x |P_bar| distance matrix, then argmax).
`criterion="min"` is the max-min variant (add the permutation farthest from its *nearest*
chosen one), which the paper does not use but which raises the set's minimal distance.

The set is regenerated, never stored: a seed fixes the first draw and ties go to the
lowest index in lexicographic order, so (count, seed, criterion) determine the set on
every machine. The distance bookkeeping is one vectorised pass over all 9! candidates per
added permutation (under 1 ms), so 1000 permutations take one to two seconds.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

Criterion = Literal["mean", "min"]
CRITERIA: tuple[str, ...] = ("mean", "min")


@functools.lru_cache(maxsize=4)
def all_permutations(n: int = 9) -> np.ndarray:
    """Every permutation of 0..n-1 in lexicographic order: (n!, n) uint8, read-only.

    Built block by block: the permutations starting with v are v followed by the
    lexicographic permutations of the remaining values.
    """
    if not 1 <= n <= 10:
        raise ValueError(f"permutations of {n} elements: n must be in 1..10")
    perms = np.zeros((1, 0), dtype=np.uint8)
    for k in range(1, n + 1):
        # perms holds the permutations of 0..k-2; extend them to 0..k-1.
        blocks = []
        for v in range(k):
            rest = np.array([u for u in range(k) if u != v], dtype=np.uint8)
            first = np.full((perms.shape[0], 1), v, dtype=np.uint8)
            blocks.append(np.concatenate([first, rest[perms]], axis=1))
        perms = np.concatenate(blocks, axis=0)
    perms.setflags(write=False)
    return perms


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between the rows of a (m, n) and b (k, n): (m, k) int."""
    a, b = np.asarray(a), np.asarray(b)
    return (a[:, None, :] != b[None, :, :]).sum(axis=2)


def pairwise_hamming(perms: np.ndarray) -> tuple[int, float]:
    """(minimum, mean) Hamming distance over all distinct pairs of rows of `perms`."""
    d = hamming(perms, perms)
    off = ~np.eye(len(perms), dtype=bool)
    return int(d[off].min()), float(d[off].mean())


def maximal_hamming_set(
    count: int = 1000, n: int = 9, seed: int = 0, criterion: Criterion = "mean"
) -> np.ndarray:
    """Algorithm 1 of Noroozi and Favaro: `count` permutations of 0..n-1, (count, n) int64.

    Row 0 is drawn uniformly from the n! permutations with numpy's Generator seeded by
    `seed`; each later row maximises the summed (criterion "mean") or minimal ("min")
    Hamming distance to the rows before it, ties broken by the lowest lexicographic index.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
    perms = all_permutations(n)
    total = perms.shape[0]
    if not 1 <= count <= total:
        raise ValueError(f"count {count}: must be in 1..{total} ({n}! permutations)")
    # Work with matches (positions where two permutations agree; distance = n - matches):
    # maximising the summed distance to the set minimises the summed matches, maximising
    # the minimal distance minimises the maximal matches. Small unsigned counters and one
    # contiguous row per position keep each pass over the n! candidates near 0.5 ms.
    cols = np.ascontiguousarray(perms.T)  # (n, n!)
    # A chosen permutation's score is set to `taken`, which no candidate reaches and which
    # later additions (at most n per step) cannot overflow: it never wins the argmin again.
    if criterion == "mean":
        dtype = np.uint16 if 2 * n * count < 2**16 else np.uint32
        taken = int(np.iinfo(dtype).max) - n * count
    else:
        dtype, taken = np.uint8, 255  # np.maximum keeps it at 255
    score = np.zeros(total, dtype)
    matches = np.empty(total, np.uint8)
    rng = np.random.default_rng(seed)
    j = int(rng.integers(total))
    chosen = [j]
    for _ in range(count - 1):
        p = perms[j]
        np.equal(cols[0], p[0], out=matches.view(bool))
        for k in range(1, n):
            np.add(matches, cols[k] == p[k], out=matches)
        if criterion == "mean":
            np.add(score, matches, out=score, casting="unsafe")
        else:
            np.maximum(score, matches, out=score)
        score[j] = taken
        j = int(np.argmin(score))
        chosen.append(j)
    return perms[np.array(chosen)].astype(np.int64)


@functools.lru_cache(maxsize=8)
def permutation_set(count: int = 1000, seed: int = 0, criterion: Criterion = "mean") -> np.ndarray:
    """`maximal_hamming_set` for 3x3 puzzles, cached per process (read-only)."""
    out = maximal_hamming_set(count, 9, seed, criterion)
    out.setflags(write=False)
    return out
