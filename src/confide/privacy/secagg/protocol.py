"""Secure aggregation as two state machines: SecAggClient (one per site, ``client``) and SecAggServer
(``server``); this module states the protocol and whom it holds against.

The protocol is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS
2017, Fig. 4, with the consistency check of their actively secure variant), over the sparse neighbour graph
of Bell et al. (CCS 2020, "SecAgg+"), with the graph's session value drawn by commit and reveal. Each site u

1. commits to a fresh random contribution c_u (a hash);
2. once the server has sent the digest of every commitment, advertises two fresh X25519 public keys, c_u (to
   encrypt shares) and s_u (for masks), and reveals c_u;
3. derives the session value from every revealed contribution (``session``) and from it the neighbour graph
   (``graph``), itself; draws a self-mask seed b_u, Shamir-shares b_u and its mask private key s_u with
   threshold t among its neighbours N(u) and itself, and sends each neighbour its shares, encrypted with
   AES-GCM under a key agreed from c_u and the neighbour's c_v;
4. sends y_u = x_u + PRG(b_u) + sum_{v in N(u) that shared} sign(u, v) * PRG(s_uv) in Z_(2^b), where x_u is
   its fixed-point encoded update, s_uv the seed agreed from s_u and s_v, and sign(u, v) = +1 if u comes
   before v in the sorted site list and -1 otherwise, so that the pairwise masks cancel in the sum;
5. receives the survivor set S (whose masked inputs are in the sum), checks it, records it for this round of
   the run (``history``), and signs (session, round, S) with its Ed25519 identity in the authenticated mode;
6. given S again with the signatures over it of at least t of its neighbourhood, returns its share of b_v
   for each neighbour v in S (and its own) and its share of s_v for each neighbour that shared but is not
   in S; never both for one v, and never for a set other than the one it signed.

The server sums the y_u as they arrive, then removes PRG(b_u) for every survivor and, for every site that
dropped after sharing, the masks it had agreed with its surviving neighbours (from s_u, reconstructed). It
refuses a sum that lies outside [-|S| R, |S| R] on any coordinate (``SumOutOfRange``). The sum comes out
exactly if each survivor, and each dropped site with surviving neighbours, keeps at least t holders of its
shares through step 6; otherwise the round is abandoned (SecAggAbort) before anything is reconstructed.

Threat model: what holds against whom (k neighbours, threshold t, default t = ceil(2 (k + 1) / 3)).

- An honest-but-curious server, with fewer than t colluding sites in any neighbourhood, learns the sum of the
  survivors' clipped fixed-point updates, who survived each step, and message sizes; nothing more about any
  one update, as long as the surviving honest sites stay connected in the graph.
- A malicious server that deviates from the protocol in any way, colluding with c sites of a neighbourhood
  of k + 1 holders, with 2t > (k + 1) + c (the default tolerates c < (k + 1) / 3): it cannot unmask one
  site's input. To do so it needs t shares of both b_u and s_u; an honest holder gives at most one of the
  two, for the one survivor set it signed, so the honest holders split in two disjoint groups and
  t <= h_1 + c, t <= h_2 + c, h_1 + h_2 <= k + 1 - c would need 2t <= (k + 1) + c. Specifically:
  * lying about who dropped (telling some holders "u survived", others "u dropped"): stopped by that
    count, since an honest holder gives one of u's two shares and never both. The consistency round (step
    5) adds that a site reveals anything only for the one survivor set it signed, shown with t signatures
    of its neighbourhood over that very set, checked against the registry the site was given (never
    against keys from a server message): no site answers for a set its neighbourhood did not agree to, and
    the server ends the round holding t signatures on the set whose sum it took. It does not improve the
    bound by itself: c colluders can sign both sets, so at a majority threshold each honest group still
    finds t signatures (tests/attacks/test_secagg_split_view.py shows both);
  * unmasking one round twice over sets that differ by one site (the difference of the sums is that site's
    input): a site keeps, per (run, round), the set it signed in a SurvivorStore and refuses any other set,
    in this attempt or a later one, as long as that store lasts (durable at a deployed site);
  * proposing weaker parameters (two sites, a huge clipping range, no fractional bits, a lower threshold,
    the unauthenticated mode, another vector size): sites check the Setup against their own configuration
    (SecAggExpectation) and refuse any difference; a sum over fewer than ``min_sites`` is refused too;
  * choosing the graph (a victim surrounded by its sybils): the session value is a hash of every committed
    site's contribution, each fixed before any is revealed; each site checks the contributions against the
    digest it saw before revealing its own and computes the graph itself. What the server keeps: choosing
    which commitments to take in step 1 (blind: it has seen no contribution then), and abandoning an attempt
    after the reveals (a committed site that does not reveal ends the attempt rather than being dropped) to
    start a new one; each new attempt is a fresh uniform graph, visible to every site as another Setup for
    the same round. So the server gets one uniform draw per attempt, as in the honest protocol it gets one
    per round, and the bound is the number of attempts a site accepts (the deployment's retry limit) times
    the chance that a uniform graph puts t of its c sybils beside the victim (Bell et al. 2020, Sec. 4);
  * substituting keys (a man in the middle between sites): in the authenticated mode every advertised key
    carries the owner's signature over (nonce, round, commitment digest, site, keys, contribution), checked
    by the server and by each neighbour against the registry; without that mode the server can substitute
    keys and unmask anyone, so a deployment facing a malicious server must run authenticated;
  * a wrong-sized, wrapped or inflated sum: refused by the range check, which catches any input outside
    what clipped updates can add up to; an input that stays in range shifts the sum by at most 2 |S| R per
    coordinate, like any bad update (secure aggregation hides individual updates, so it cannot filter them).
- A site learns its neighbours' public keys, every site's contribution, the survivor set, and shares of its
  neighbours' secrets that are useless below t; the masked vectors never reach the sites. A coalition of
  sites without the server learns nothing. A site can spoil the sum (a wrong share or input: the round is
  abandoned or the sum shifted within range) or end an attempt (by not revealing its contribution), but it
  learns nothing by doing so.
- Not covered: a server that runs many rounds or attempts gets one uniform graph each (choose k and t for the
  largest c expected, per Bell et al.); the server learns who survived and message sizes; the sybils a server
  can field are bounded only by the registry (authenticated mode) and ``min_sites``.

Each party's methods take the sender as the transport authenticated it, separately from the message; a message
whose ``sender`` field disagrees is refused, as is one for another round or step, a second one from the same
party in a step, and anything malformed. Nothing here does I/O, reads a clock or keeps global state.
"""

from __future__ import annotations

from confide.privacy.secagg.client import SecAggClient
from confide.privacy.secagg.common import (
    SECRET_BYTES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    SHARE_PLAINTEXT_BYTES,
    SecAggResult,
    check_site_ids,
    mask_seed,
    params_of,
    share_associated_data,
    share_key,
)
from confide.privacy.secagg.server import SecAggServer

__all__ = [
    "SECRET_BYTES",
    "SHARE_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "SecAggClient",
    "SecAggResult",
    "SecAggServer",
    "check_site_ids",
    "mask_seed",
    "params_of",
    "share_associated_data",
    "share_key",
]
