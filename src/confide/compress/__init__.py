"""Update compression: site layers that make an update smaller on the wire, server layers that read it back.

A compression layer sits after the privacy layers that need the clear vector (clip, distributed noise) and
before the ones that protect it (secure aggregation, CKKS, the enclave), as the registry's order says. Its
``encode`` replaces the update's float32 ``vector`` by a small ``payload`` of byte arrays; its ``decode`` on
the server rebuilds a float32 vector, or refuses a malformed payload with an
:class:`~confide.errors.UpdateError` (the site loses the round, the run goes on).

* :mod:`~confide.compress.quantize`: unbiased stochastic quantization to b bits per value, optionally after
  a random Hadamard rotation (Suresh et al. 2017; DRIVE, Vargaftik et al. 2021);
* :mod:`~confide.compress.sparsify`: top-k sparsification with error feedback (Stich et al. 2018; Deep
  Gradient Compression, Lin et al. 2018), the residual kept in the site's durable state;
* :mod:`~confide.compress.cast`: float16 or bfloat16 transport;
* :mod:`~confide.compress.downlink`: the other direction, the model the server sends: each site gets the
  compressed changes to the public model it holds (EF21-P, Gruntkowska et al. 2023), or that model in full;
  independent of the uplink's kind, it runs with secure aggregation and the enclave too.

With DP the order is clip, noise, then compress: what the site sends is a function of the clipped (and
noised) update alone, and the server re-clips what it decodes under central DP, so the sensitivity bound
and the accountant are unaffected. With secure aggregation only quantization runs, and the secure-aggregation
layer does it into its own ring (:mod:`confide.privacy.quantized`), so the masked vector shrinks too;
compression cannot run with CKKS or the enclave, which need the clear vector at the site (the config says so).
"""

from __future__ import annotations

from confide.compress.codec import PREFIX, expected_size, read_bytes

__all__ = ["PREFIX", "expected_size", "read_bytes"]
