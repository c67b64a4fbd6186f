"""What a malicious server does with the secrets it manages to collect: the attack tests in tests/attacks
mount their attacks through the protocol's classes and use these to check whether a victim's input fell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from confide.privacy.secagg import FixedPoint, keys, prg, shamir
from confide.privacy.secagg.protocol import SECRET_BYTES, mask_seed


def reconstruct_any(points: Mapping[str, int], shares: Mapping[str, np.ndarray]) -> bytes | None:
    """The secret that ``shares`` interpolate to, whatever their number (fewer than t give a wrong one), or
    None when they give no 32-byte secret at all or there are none."""
    if not shares:
        return None
    holders = sorted(shares)
    try:
        return shamir.reconstruct(
            [points[h] for h in holders], np.stack([shares[h] for h in holders]), SECRET_BYTES
        )
    except ValueError:
        return None


def unmask_alone(
    fixed: FixedPoint,
    masked: np.ndarray,
    victim: str,
    sites: Sequence[str],
    self_seed: bytes,
    pairwise: Mapping[str, bytes],
) -> np.ndarray:
    """The victim's encoded input from its masked input, its self-mask seed, and the seeds of its pairwise
    masks (neighbour -> seed): y - PRG(b) - sum_v sign(victim, v) PRG(s_uv), as the victim added them."""
    index = {s: i for i, s in enumerate(sorted(sites))}
    total = masked.astype(fixed.dtype.newbyteorder("=")).copy()
    seeds = [self_seed, *pairwise.values()]
    signs = [-1] + [-1 if index[victim] < index[v] else 1 for v in pairwise]
    prg.add_masks(total, seeds, signs)
    total &= total.dtype.type(fixed.mask)
    return total


def pairwise_from_mask_key(
    private: bytes, victim: str, neighbour_keys: Mapping[str, bytes], session: bytes, round: int
) -> dict[str, bytes]:
    """The victim's pairwise mask seeds, from its mask private key and its neighbours' mask public keys."""
    key = keys.private_from_bytes(private)
    return {v: mask_seed(keys.agree(key, p), session, round, victim, v) for v, p in neighbour_keys.items()}


def recovered(fixed: FixedPoint, candidate: np.ndarray | None, vector: np.ndarray) -> bool:
    """Whether ``candidate`` is exactly the victim's encoded input."""
    return candidate is not None and np.array_equal(candidate, fixed.encode(vector))
