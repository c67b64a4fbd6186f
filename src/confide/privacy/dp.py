"""Site-level DP-FedAvg: clip each site's update, put Gaussian noise on their sum, and adapt the clip norm.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models"): each site's update is
clipped to L2 norm C, so one site moves the sum of updates by at most C; Gaussian noise of standard
deviation z·C on that sum then makes every released model (epsilon, delta)-DP for the sites, with epsilon
from :mod:`confide.privacy.accountant`. The unit of privacy is a whole site, with all its records.

Where the noise is added decides whom it protects against:

* **central** (:class:`CentralDP` around :class:`EqualMean`): the aggregator sees every clipped update and
  adds N(0, (zC)²) to their sum. It protects the released models against everyone but the aggregator, which
  is trusted.
* **distributed** (:class:`DistributedNoiseLayer`): each of n sites adds N(0, (zC)²/n) to its own clipped
  update, so the sum carries the full N(0, (zC)²). One site's vector carries only 1/√n of the noise and is
  *not* protected by itself, so distributed noise must be followed by a layer that shows the server only
  the sum (secure aggregation). Then the server never sees anything that is not DP.

Aggregation must weight the sites equally. FedAvg weights each update by its number of examples, which
would let one large site move the mean by more than C / (number of sites) and break the sensitivity
bound. :class:`EqualMean` is the aggregator to use: the unweighted sum, noised, over a fixed denominator.

Adaptive clipping (Andrew et al. 2021, :class:`AdaptiveClip`) moves C towards a quantile of the update norms
from a noised count of the sites whose update was not clipped; the noise on that count is part of the
budget (see :func:`confide.privacy.accountant.combined_noise`).

Threat model: every noise here is drawn from secret randomness (:mod:`confide.randomness`), never from
the run's seed, so no one who knows the config can regenerate it; only the insecure simulation setting
``privacy.insecure_reproducible_noise`` seeds it. Noise is added in float32, and floating-point Gaussian
samplers leak through their low bits (Mironov 2012); this module does not defend against that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from confide.core import Plan, Update, Vector
from confide.errors import ConfigError, UpdateError
from confide.pipeline import Aggregator, Layer, RoundContext, SiteContext, StackContext, Traits
from confide.privacy.matrix import BandedNoise
from confide.randomness import Randomness

NORM_METRIC = "update_norm"
"""Metric key of an update's L2 norm before clipping."""
CLIPPED_METRIC = "clipped"
"""Metric key of the clipping bit: 1.0 when the update was longer than the clip norm and was shortened."""

# Shrink clipped vectors by a hair more than C / norm: rounding each float32 coordinate can lengthen a vector
# by up to 2^-24 of its norm, and the sensitivity bound ||clip(v)|| <= C must hold exactly, not nearly.
_CLIP_MARGIN = 1.0 - 2.0**-20


def _check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"privacy.{name} must be a finite number > 0 (got {value!r})")


def _check_noise(value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ConfigError(f"privacy.noise_multiplier must be a finite number >= 0 (got {value!r})")


def l2_norm(vector: Vector) -> float:
    """The L2 norm of a float32 vector, summed in float64 (float32 sums drift on million-long vectors)."""
    return math.sqrt(float(np.einsum("i,i->", vector, vector, dtype=np.float64)))


def clip(vector: Vector, clip_norm: float, out: Vector | None = None) -> tuple[Vector, float]:
    """``vector`` scaled to L2 norm at most ``clip_norm``, and its norm before clipping.

    A vector no longer than ``clip_norm`` comes back unchanged. ``vector`` itself is left alone unless it is
    also ``out`` (then it is clipped in place, with no copy).
    """
    _check_positive("clip_norm", clip_norm)
    norm = l2_norm(vector)
    result = vector.copy() if out is None else out
    if out is not None and out is not vector:
        np.copyto(out, vector)
    if norm > clip_norm:
        result *= np.float32(clip_norm / norm * _CLIP_MARGIN)
    return result, norm


UNCLIPPED = "unclipped"
"""Sum key of the adaptive-clipping bit b_i = 1 when the update was no longer than the clip norm."""


class ClipLayer(Layer):
    """Site-level DP's clipping: the site clips its update to ``clip_norm``; the server, where it can read
    each update (central DP), clips it again, so a site that skips clipping still moves the sum by at most
    C: the sensitivity bound must not rest on the sites' good will.

    The site reports its norm before clipping and the clipping bit (:data:`NORM_METRIC`,
    :data:`CLIPPED_METRIC`) as metrics, and the bit b_i = [norm <= C] as a sum (:data:`UNCLIPPED`) for
    adaptive clipping. Metrics travel in clear only where the aggregator is trusted (central DP); under
    distributed DP the noise layer removes them and secure aggregation carries only the sum of the bits.

    The clip norm of a round comes in the plan (adaptive clipping moves it between rounds). Aggregate
    clipped updates with equal weights (:class:`EqualMean`), not by number of examples.
    """

    name = "clip"

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        return stack.dp.clip if stack.dp is not None else None

    def __init__(self, clip_norm: float, report: bool = True) -> None:
        _check_positive("clip_norm", clip_norm)
        self.clip_norm = float(clip_norm)
        self.report = report

    def _norm_for(self, plan: Plan) -> float:
        return float(plan.clip_norm) if plan.clip_norm > 0 else self.clip_norm

    def encode(self, update: Update, site: SiteContext) -> Update:
        if update.vector is None:
            raise UpdateError(
                f"site {update.site!r}: clipping needs the update's vector, but a layer before it replaced "
                "the vector by a protected payload; put clip first in the layer stack"
            )
        clip_norm = self._norm_for(site.plan)
        _, norm = clip(update.vector, clip_norm, out=update.vector)
        if self.report:
            update.metrics[NORM_METRIC] = norm
            update.metrics[CLIPPED_METRIC] = float(norm > clip_norm)
        update.sums[UNCLIPPED] = float(norm <= clip_norm)
        return update

    def decode(self, update: Update, round: RoundContext) -> Update | None:
        if update.vector is not None:
            task = round.tasks.get(update.site)
            clip_norm = self._norm_for(task.plan) if task is not None else self.clip_norm
            clip(update.vector, clip_norm, out=update.vector)
        return update

    def __repr__(self) -> str:
        return f"ClipLayer(clip_norm={self.clip_norm}, report={self.report})"


class DistributedNoiseLayer(Layer):
    """Each site adds N(0, (z·C)² / num_sites) to its clipped update, so the sum of num_sites updates carries
    N(0, (z·C)²), the noise of central DP-FedAvg.

    It guarantees the accounted noise only if at least ``num_sites`` updates reach the sum: with k < num_sites
    the sum carries the noise of multiplier :meth:`effective_noise_multiplier` (k) and must be accounted so.
    Set ``num_sites`` to the fewest sites that can complete a round, not to the number asked.

    The server must see only the sum, so the stack check asks for a later layer that hides updates (secure
    aggregation). Secure aggregation works on integers; quantising the noised vector to its field rounds the
    noise too, which the secure-aggregation layer must account for (or use the discrete Gaussian, Kairouz et
    al. 2021).

    Threat model: the noise is drawn from the site's secret randomness (:mod:`confide.randomness`), so the
    server, which chose every seed of the run, cannot regenerate and subtract it.
    """

    name = "distributed_noise"
    traits = Traits(needs_hidden_updates=True)

    @classmethod
    def from_config(cls, stack: StackContext) -> Layer | None:
        if stack.dp is None or stack.dp.placement != "distributed":
            return None
        return stack.dp.noise_share

    def __init__(self, clip_norm: float, noise_multiplier: float, num_sites: int) -> None:
        _check_positive("clip_norm", clip_norm)
        _check_noise(noise_multiplier)
        if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
            raise ConfigError(
                f"the number of sites that share the noise must be a whole number >= 1 (got {num_sites!r})"
            )
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.num_sites = num_sites

    def std(self, clip_norm: float | None = None) -> float:
        """Standard deviation of one site's share of the noise, per coordinate."""
        c = self.clip_norm if clip_norm is None else clip_norm
        return self.noise_multiplier * c / math.sqrt(self.num_sites)

    def effective_noise_multiplier(self, reported: int) -> float:
        """The noise multiplier of a sum of ``reported`` sites' updates: z·sqrt(reported / num_sites)."""
        return self.noise_multiplier * math.sqrt(reported / self.num_sites)

    def encode(self, update: Update, site: SiteContext) -> Update:
        if update.vector is None:
            raise UpdateError(
                f"site {update.site!r}: distributed noise needs the update's vector, but a layer before it "
                "replaced the vector by a protected payload; put the noise before compression and protection"
            )
        # The server may be curious under distributed DP: a clear norm or clipping bit would bypass the noise.
        update.metrics.pop(NORM_METRIC, None)
        update.metrics.pop(CLIPPED_METRIC, None)
        clip_norm = float(site.plan.clip_norm) if site.plan.clip_norm > 0 else self.clip_norm
        update.vector += site.randomness.normal(update.vector.size, self.std(clip_norm))
        return update

    def __repr__(self) -> str:
        return (
            f"DistributedNoiseLayer(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
            f"num_sites={self.num_sites})"
        )


class CentralNoise:
    """The aggregator's noise: N(0, (z·C)²) on the SUM of the clipped updates, which on a result that one
    site moves by at most ``sensitivity`` is N(0, (z·sensitivity)²).

    Divide the noised sum by a fixed denominator, the expected number of sites per round (McMahan et al.
    2018's fixed-denominator estimator f̃_f): the mean then moves by at most C / denominator when one site is
    added or removed, and the noise scales with it. Dividing by the number of sites that actually reported
    keeps the guarantee only when that number is no secret, as with fixed-size sampling (every round draws
    the same count, and sites that drop out only make the sum smaller); under Poisson sampling the count
    itself depends on who took part, so use the expected count (as :class:`EqualMean` does when given one).
    """

    def __init__(
        self, clip_norm: float, noise_multiplier: float, correlated: BandedNoise | None = None
    ) -> None:
        _check_positive("clip_norm", clip_norm)
        _check_noise(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.correlated = correlated
        """DP-FTRL's correlated noise (:mod:`confide.privacy.matrix`); None: fresh noise every round."""

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def draw(self, size: int, std: float, randomness: Randomness) -> Vector:
        """This round's noise of standard deviation ``std`` per coordinate: fresh, or the next of the
        correlated stream (whose own scale is ``std`` times that of C^-1 z with unit z)."""
        if self.correlated is None:
            return randomness.normal(size, std)
        noise = self.correlated.next(size, randomness)
        noise *= np.float32(std)
        return noise

    def __repr__(self) -> str:
        return (
            f"CentralNoise(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
            f"correlated={self.correlated!r})"
        )


@dataclass
class SumState:
    total: Vector
    count: int = 0


class EqualMean:
    """DP-FedAvg's aggregator: the equally weighted sum of clipped updates over a denominator.

    Every site weighs 1 whatever its number of examples (an example-weighted mean would let one large site
    move the result by more than C / sites). ``expected_sites`` is the fixed denominator (sites per round,
    or q × population); None divides by the number of updates that arrived (see :class:`CentralNoise` for
    when that is safe).
    """

    name = "equal_mean"
    traits = Traits()

    def __init__(self, expected_sites: float | None = None) -> None:
        if expected_sites is not None:
            _check_positive("expected_sites", expected_sites)
        self.expected_sites = expected_sites

    def init(self, size: int) -> SumState:
        return SumState(total=np.zeros(size, dtype=np.float32))

    def add(self, state: SumState, update: Update) -> None:
        state.total += update.readable(state.total.size)
        state.count += 1

    def add_sum(self, state: SumState, total: Vector, count: int) -> None:
        """Fold in the sum of ``count`` clipped updates that arrived summed (secure aggregation)."""
        if total.shape != state.total.shape:
            raise UpdateError(f"a sum of {total.size} values arrived; the model has {state.total.size}")
        state.total += total
        state.count += count

    def result(self, state: SumState, randomness: Randomness) -> Vector:
        denominator = self.expected_sites if self.expected_sites is not None else state.count
        if denominator == 0:
            raise UpdateError("no update arrived this round; there is nothing to aggregate")
        state.total /= np.float32(denominator)
        return state.total

    def sensitivity(self, clip_norm: float) -> float | None:
        return clip_norm / self.expected_sites if self.expected_sites is not None else None


class CentralDP:
    """Central DP around any aggregator whose sensitivity is bounded: its result plus Gaussian noise of
    standard deviation z times that sensitivity, drawn from the server's secret randomness.

    Threat model: the aggregator sees every clipped update and is trusted; the noise protects the released
    models against everyone else (sites, and whoever receives the model). Because the noise is added after
    aggregation, validation and robust aggregation run before it, on the clear updates.
    """

    def __init__(self, inner: Aggregator, noise: CentralNoise) -> None:
        if inner.sensitivity(1.0) is None:
            raise ConfigError(
                f"central DP needs an aggregator whose result one site moves by a bounded amount; "
                f"{inner.name!r} weighs sites unequally: use equal weights with a fixed denominator"
            )
        self.inner = inner
        self.noise = noise
        self.name = f"central_dp({inner.name})"
        self.traits = inner.traits

    def init(self, size: int) -> Any:
        return self.inner.init(size)

    def add(self, state: Any, update: Update) -> None:
        self.inner.add(state, update)

    def add_sum(self, state: Any, total: Vector, count: int) -> None:
        self.inner.add_sum(state, total, count)

    def result(self, state: Any, randomness: Randomness) -> Vector:
        result = self.inner.result(state, randomness)
        sensitivity = self.inner.sensitivity(self.noise.clip_norm)
        assert sensitivity is not None
        result += self.noise.draw(result.size, self.noise.noise_multiplier * sensitivity, randomness)
        return result

    def sensitivity(self, clip_norm: float) -> float | None:
        return self.inner.sensitivity(clip_norm)


@dataclass(frozen=True)
class AdaptiveClip:
    """The clip norm of adaptive clipping, as explicit state (Andrew et al. 2021, Algorithm 1).

    Each round, every site reports the bit b_i = 1 if its update norm is at most C. The server noises the sum
    of the bits with N(0, sigma_b²), takes the fraction b̄, and moves C geometrically towards the
    ``target_quantile`` gamma of the norms:

        C ← C · exp(−eta_C · (b̄ − gamma)).

    A frozen dataclass of four numbers, so it checkpoints as it is; :meth:`update` returns the next state.
    The paper's defaults are gamma = 0.5, eta_C = 0.2, sigma_b = expected sites per round / 20; account the
    run with the combined noise multiplier (:func:`confide.privacy.accountant.combined_noise`).
    """

    clip_norm: float
    target_quantile: float
    learning_rate: float
    """eta_C, the step of the geometric update."""
    bits_noise: float
    """sigma_b: standard deviation of the noise on the sum of bits (not a multiplier); 0 is not DP."""

    def __post_init__(self) -> None:
        _check_positive("clip_norm", self.clip_norm)
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"privacy.target_quantile must lie in (0, 1) (got {self.target_quantile})")
        _check_positive("clip_learning_rate", self.learning_rate)
        if not (math.isfinite(self.bits_noise) and self.bits_noise >= 0):
            raise ConfigError(f"privacy.bits_noise must be a finite number >= 0 (got {self.bits_noise})")

    @classmethod
    def init(
        cls, initial_clip: float, target_quantile: float, learning_rate: float, bits_noise: float
    ) -> AdaptiveClip:
        return cls(initial_clip, target_quantile, learning_rate, bits_noise)

    def bit(self, norm: float) -> float:
        """1.0 if an update of this norm passes the current clip norm unchanged, else 0.0."""
        return float(norm <= self.clip_norm)

    def update(
        self,
        sum_of_bits: float,
        num_sites: int,
        randomness: Randomness,
        expected_sites: float | None = None,
    ) -> AdaptiveClip:
        """The next state, from the clear sum of the ``num_sites`` bits of this round (central placement):
        the aggregator adds N(0, sigma_b²) from its secret randomness."""
        noised = sum_of_bits + float(randomness.normal(1, self.bits_noise)[0])
        return self.update_noised(noised, num_sites, expected_sites)

    def update_noised(
        self, noised_sum_of_bits: float, num_sites: int, expected_sites: float | None = None
    ) -> AdaptiveClip:
        """The next state, from a sum of bits that already carries its noise (e.g. added by the sites).

        The bits are centred (b_i − 1/2, so one site moves the sum by 1/2) and divided by ``expected_sites``
        when given: the fixed denominator the privacy analysis assumes under Poisson sampling. Without it
        the fraction is over ``num_sites``.
        """
        denominator = expected_sites if expected_sites is not None else num_sites
        if denominator <= 0:
            return self
        fraction = (noised_sum_of_bits - num_sites / 2) / denominator + 0.5
        clip_norm = self.clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return replace(self, clip_norm=clip_norm)
