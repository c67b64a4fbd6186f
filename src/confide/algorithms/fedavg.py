"""FedAvg (McMahan et al. 2017): local SGD from the global weights; the site sends its delta."""

from __future__ import annotations

from confide.algorithms import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
