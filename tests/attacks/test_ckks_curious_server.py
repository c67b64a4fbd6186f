"""Attack: under CKKS, a server keeps everything it receives and holds (each site's update as it would go on
the wire, the global model, its checkpoint, its state) and tries to read an update or the model. It holds
only ciphertexts and the public key, which cannot decrypt: every attempt fails. The control shows the limit
the README states: one site that colludes with the server gives it the key, and the same captured
ciphertexts then open to the site's update and the model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from confide import config
from confide.core import Task, Update, Vector, is_encrypted
from confide.privacy.he.ceremony import PUBLIC_KEY, SECRET, from_state
from confide.privacy.he.ckks import PublicKey, SecretKey
from confide.privacy.he.layer import PAYLOAD
from confide.runtime.federation import Backend
from confide.runtime.grpc import wire
from confide.runtime.runner import Runner
from tests.conftest import tiny_config
from tests.relay import Relay


class Keep(Relay):
    """The server's view: every update exactly as a deployed site would put it on the wire."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.updates: list[wire.Message] = []

    def train(self, weights: Vector, tasks: Sequence[Task]) -> Iterator[Update]:
        for update in self.inner.train(weights, tasks):
            header, tensors = wire.update_message(1, b"session", update)
            self.updates.append(wire.Message(header, dict(tensors)))
            yield update


def test_the_server_cannot_read_an_update_or_the_model_and_a_colluding_site_can(
    tmp_path: Path, text_corpus: Path
) -> None:
    path = tmp_path / "tiny.toml"
    options = {"privacy__encryption": "'ckks'", "server__optimizer": "'sgd'", "run__rounds": "2"}
    path.write_text(tiny_config(text_corpus, tmp_path / "runs", **options))
    runner = Runner.start(config.load(path))
    spy = Keep(runner.backend)
    runner.backend = spy
    runner.run()

    size = runner.layout.size
    public = PublicKey.from_bytes(runner.state.optimizer_state[PUBLIC_KEY].tobytes())
    assert len(spy.updates) >= 3
    for message in spy.updates:
        update = wire.read_update(message)
        # Nothing readable travels: no vector, no per-site metrics, only the ciphertexts.
        assert update.vector is None and update.metrics == {} and set(update.payload) == {PAYLOAD}
        with pytest.raises(ValueError):
            public.load(update.payload[PAYLOAD].tobytes(), size).decrypt()
    assert is_encrypted(runner.state.weights)
    with pytest.raises(ValueError):
        public.load(runner.state.weights.tobytes(), size).decrypt()
    assert not public.context.has_secret_key()  # from_bytes also refuses a key that holds the secret

    # The control: a site hands its key to the server, and the same captures open.
    colluder = runner.sites[0].name
    held = runner.store.get_site_state(colluder, SECRET)
    assert held is not None
    key = SecretKey.from_secret_bytes(from_state(held))
    update = wire.read_update(spy.updates[0])
    opened = key.decrypt(update.payload[PAYLOAD].tobytes(), size)
    assert np.isfinite(opened).all() and np.abs(opened).max() > 0  # a site's (weighted) update, in clear
    model = key.decrypt(runner.state.weights.tobytes(), size)
    np.testing.assert_allclose(model, runner.clear_weights(), atol=1e-6)
