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

from typing import Sequence

import numpy as np

LOOKALIKE_BITS = 20  # of 256: at most this many differing bits make two images the same picture
HASH_SIDE = 16  # pHash of 16 x 16 DCT coefficients: 256 bits


def look_hash(gray: "Image.Image") -> bytes:  # noqa: F821
    """The 32-byte perceptual hash of an 8-bit grayscale image (upright, as the model reads it)."""
    import imagehash

    return np.packbits(imagehash.phash(gray, hash_size=HASH_SIDE).hash.flatten()).tobytes()


def lookalike_pairs(hashes: Sequence[bytes | None], max_bits: int = LOOKALIKE_BITS) -> list[tuple[int, int, int]]:
    """Every pair (i, j, differing bits) with i < j whose hashes differ in at most `max_bits` bits; None (an
    image that could not be read) pairs with nothing. Compared in blocks of rows, so memory stays bounded."""
    known = [i for i, h in enumerate(hashes) if h is not None]
    if len(known) < 2:
        return []
    words = np.frombuffer(b"".join(hashes[i] for i in known), dtype=np.uint64).reshape(len(known), -1)
    rows = max(1, (1 << 22) // words.size)
    pairs = []
    for start in range(0, len(known), rows):
        block = words[start:start + rows]
        bits = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2, dtype=np.int64)
        for a, b in zip(*np.nonzero(bits <= max_bits)):
            i, j = start + int(a), int(b)
            if i < j:
                pairs.append((known[i], known[j], int(bits[a, b])))
    return pairs


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
