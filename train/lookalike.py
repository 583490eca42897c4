"""Radiographs that are the same picture in another file: re-encoded, resized, or with brightness or contrast
changed, as public collections often hold them. Byte-identical copies are found by sha256 (train.data); these
are found by a 256-bit perceptual hash (imagehash's pHash) and a Hamming distance.

The threshold was measured on cxr4 (4,641 radiographs whose card says near-duplicates were removed): the same
image saved as JPEG quality 50, resized to 128 or 512 px, brightened by 8% or gamma-changed by 0.8 moves its hash
by at most 16 of 256 bits (80 images, each change); two different radiographs are 50 or more bits apart (the
closest pairs below 50 were re-crops of one radiograph, at 24 and 40 bits). At 20 bits every such change is
found and no pair of different radiographs is; a re-crop is not found.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

LOOKALIKE_BITS = 20  # of 256: at most this many differing bits make two images the same picture
HASH_SIDE = 16  # pHash of 16 x 16 DCT coefficients: 256 bits
BLOCK_CELLS = 1 << 25  # pairs compared at once: float32 blocks of 128 MB, whatever the number of images


def look_hash(gray: "Image.Image") -> bytes:  # noqa: F821
    """The 32-byte perceptual hash of an 8-bit grayscale image (upright, as the model reads it)."""
    import imagehash

    return np.packbits(imagehash.phash(gray, hash_size=HASH_SIDE).hash.flatten()).tobytes()


def lookalike_pairs(hashes: Sequence[bytes | None], max_bits: int = LOOKALIKE_BITS,
                    against: Sequence[bytes | None] | None = None) -> list[tuple[int, int, int]]:
    """Every pair (i, j, differing bits) with i < j whose hashes differ in at most `max_bits` bits; with
    `against`, every pair of hashes[i] and against[j] instead. None (an image that could not be read) pairs with
    nothing. The same call again (a training run's image check, then its split) is answered from a cache."""
    return list(_close_pairs(tuple(hashes), max_bits, None if against is None else tuple(against)))


@functools.lru_cache(maxsize=2)
def _close_pairs(hashes: tuple[bytes | None, ...], max_bits: int,
                 against: tuple[bytes | None, ...] | None) -> tuple[tuple[int, int, int], ...]:
    rows, row_signs = _signs(hashes)
    cols, col_signs = (rows, row_signs) if against is None else _signs(against)
    pairs = []
    step = max(1, BLOCK_CELLS // max(1, len(cols)))
    for start in range(0, len(rows), step):
        first_col = start if against is None else 0  # a set against itself: the upper triangle only
        block = row_signs[start:start + step]
        # +-1 vectors: their dot product is 256 - 2 * (differing bits), exact in float32 and done by BLAS
        bits = (block.shape[1] - block @ col_signs[first_col:].T) / 2
        for a, b in zip(*np.nonzero(bits <= max_bits)):
            i, j = rows[start + int(a)], cols[first_col + int(b)]
            if against is not None or i < j:
                pairs.append((i, j, int(bits[a, b])))
    return tuple(sorted(pairs))


def _signs(hashes: Sequence[bytes | None]) -> tuple[list[int], "np.ndarray"]:
    """The positions of the known hashes, and their bits as rows of +-1 (float32)."""
    known = [i for i, h in enumerate(hashes) if h is not None]
    bits = np.unpackbits(np.frombuffer(b"".join(hashes[i] for i in known), dtype=np.uint8).reshape(len(known), -1),
                         axis=1) if known else np.zeros((0, HASH_SIDE * HASH_SIDE), np.uint8)
    return known, bits.astype(np.float32) * 2 - 1


def group_representatives(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """For each of n items, the smallest index of the items linked to it through `pairs` (its own if none)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return list(range(n))
    i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    first: dict[int, int] = {}
    return [first.setdefault(int(c), k) for k, c in enumerate(component)]
