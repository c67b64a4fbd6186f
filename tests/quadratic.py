"""A federated quadratic: site i's loss is h_i/2 * ||w - c_i||^2, so every algorithm's answer is known.

The real Trainer, Federation and LocalBackend run on it: the "model" reads the site's id from the first
input code of each window, and its loss is the site's quadratic. With different curvatures h_i the optimum
of the average loss, w* = sum h_i c_i / sum h_i, differs from where FedAvg with many local steps settles,
which is the client drift SCAFFOLD removes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from confide.data.dataset import FederatedDataset, SiteData


class Quadratic(nn.Module):
    def __init__(self, centers: np.ndarray, curvatures: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(centers.shape[1]))
        self.register_buffer("centers", torch.from_numpy(centers.astype(np.float32)))
        self.register_buffer("curvatures", torch.from_numpy(curvatures.astype(np.float32)))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        site = idx[:, 0]
        diff = self.w[None, :] - self.centers[site]
        loss = 0.5 * (self.curvatures[site] * (diff * diff).sum(1)).mean()
        return diff, loss


def quadratic_problem(
    num_sites: int = 4, dim: int = 3, windows: int = 8, seed: int = 0
) -> tuple[Quadratic, FederatedDataset, np.ndarray, np.ndarray]:
    """The model, a data set whose site k's windows all carry code k, and the centers and curvatures."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(num_sites, dim))
    curvatures = np.geomspace(0.2, 2.0, num_sites)
    sites = []
    for k in range(num_sites):
        data = np.full((windows, 81), k, dtype=np.uint8)
        sites.append(SiteData(name=f"q{k}", group=f"q{k}", train=data, test=data[:2]))
    dataset = FederatedDataset(name="quadratic", sites=tuple(sites), vocab_size=97)
    return Quadratic(centers, curvatures), dataset, centers, curvatures


def optimum(centers: np.ndarray, curvatures: np.ndarray) -> np.ndarray:
    """The minimizer of the sites' mean loss."""
    return (curvatures[:, None] * centers).sum(0) / curvatures.sum()
