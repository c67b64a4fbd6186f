from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from confide.core import Layout
from confide.errors import UpdateError


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    m[2].bias.requires_grad_(False)  # frozen parameters are not part of the exchanged vector
    return m


def test_layout_names_shapes_offsets() -> None:
    layout = Layout.of_module(model())
    assert layout.names == ("0.weight", "0.bias", "2.weight")
    assert [e.offset for e in layout.entries] == [0, 12, 16]
    assert layout.size == 24


def test_read_write_round_trip_moves_weights_without_rebuilding() -> None:
    m = model()
    layout = Layout.of_module(m)
    vector = layout.read(m)
    params = [p for p in m.parameters()]
    layout.write(m, vector * 2)
    assert [p for p in m.parameters()] == params  # same parameter objects, new values
    np.testing.assert_array_equal(layout.read(m), vector * 2)
    np.testing.assert_array_equal(m[0].weight.detach().numpy().ravel(), vector[:12] * 2)


def test_unflatten_gives_views() -> None:
    layout = Layout.of_module(model())
    vector = layout.zeros()
    layout.unflatten(vector)["0.bias"][:] = 7.0
    assert (vector[12:16] == 7.0).all() and vector[:12].sum() == 0


@pytest.mark.parametrize(
    "bad", [np.zeros(23, np.float32), np.zeros(24, np.float64), np.zeros((2, 12), np.float32), [0.0] * 24]
)
def test_check_refuses_wrong_vectors(bad: object) -> None:
    with pytest.raises(UpdateError, match=r"flat float32 array of 24|numpy array"):
        Layout.of_module(model()).check(bad)
