"""The CKKS key ceremony against the server that relays it: the sites share one key, the server gets only its
public half, and a server that swaps keys or forges a delivery is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from confide.client.state import MemorySiteState
from confide.errors import UpdateError
from confide.privacy.he import ceremony
from confide.privacy.he.ceremony import KEYED, PUBLIC_KEY, SECRET, Ceremony
from confide.privacy.he.ckks import PublicKey, SecretKey
from confide.privacy.secagg import keys

SITES = ["a", "b", "c"]


class Federation:
    """Each site with only its own identity (as deployed), every site's state, and a relaying server whose
    messages a test may rewrite on their way (``tamper``)."""

    def __init__(self) -> None:
        self.identities = {site: keys.generate_identity() for site in SITES}
        registry = {site: keys.identity_public_bytes(key) for site, key in self.identities.items()}
        self.sites = {site: Ceremony("a", {site: self.identities[site]}, registry) for site in SITES}
        self.states = {site: MemorySiteState() for site in SITES}
        self.sessions: dict[str, dict[str, Any]] = {site: {} for site in SITES}
        self.server = Ceremony("a", {})
        self.server_state: dict[str, np.ndarray] = {}
        self.tamper: Any = None
        self.refusals: list[str] = []
        self.answers: list[tuple[str, bytes]] = []

    def exchange(self, messages: Mapping[str, bytes]) -> Iterator[tuple[str, bytes]]:
        for site, data in messages.items():
            if self.tamper is not None:
                site, data = self.tamper(site, data)
            try:
                answer = self.sites[site].answer(data, site, self.sessions[site], self.states[site])
            except UpdateError as e:
                self.refusals.append(str(e))
                continue
            self.answers.append((site, answer))
            yield site, answer

    def run(self, sites: list[str], number: int = 1) -> None:
        self.server.run(number, sites, self.exchange, self.server_state)

    def key(self, site: str) -> SecretKey | None:
        held = self.states[site].get(site, SECRET)
        return None if held is None else SecretKey.from_secret_bytes(ceremony.from_state(held))

    def keyed(self) -> list[str]:
        held = self.server_state.get(KEYED)
        return [] if held is None else held.tobytes().decode().split("\n")


def test_every_site_gets_the_one_key_and_the_server_only_its_public_half() -> None:
    f = Federation()
    f.run(["a", "b"])
    f.run(["b", "c"], number=2)  # c joins later and gets the key from b, a site that holds it
    assert f.keyed() == ["a", "b", "c"]
    held = [f.key(site) for site in SITES]
    assert all(k is not None for k in held)
    assert len({k.secret_bytes() for k in held if k is not None}) == 1
    public = PublicKey.from_bytes(f.server_state[PUBLIC_KEY].tobytes())  # refuses a secret key
    assert not public.context.has_secret_key()
    # What the server holds encrypts for the sites: a site decrypts it.
    assert held[2] is not None
    decrypted = held[2].decrypt(public.encrypt(np.arange(5.0)).to_bytes(), 5)
    np.testing.assert_allclose(decrypted, np.arange(5.0), atol=1e-7)


def test_a_server_that_puts_its_own_key_in_a_hello_gets_nothing_sealed_to_it() -> None:
    f = Federation()
    mine = keys.generate()

    def swap(site: str, data: bytes) -> tuple[str, bytes]:
        message = json.loads(data[len(ceremony.TAG) :])
        if message["step"] == "share":
            hello = json.loads(ceremony.base64.b64decode(message["hellos"]["b"]))
            hello["public"] = ceremony._b64(keys.public_bytes(mine))  # the server's key in b's place
            message["hellos"]["b"] = ceremony._b64(json.dumps(hello).encode())
            return site, ceremony.TAG + json.dumps(message).encode()
        return site, data

    f.tamper = swap
    f.run(["a", "b", "c"])
    # The key holder checked b's hello against b's enrolled identity and sealed nothing to the swapped key:
    # the server holds no box it could open.
    shared = [json.loads(answer) for site, answer in f.answers if site == "a" and b"sealed" in answer]
    assert len(shared) == 1 and "b" not in shared[0]["sealed"] and {"a", "c"} <= set(shared[0]["sealed"])
    assert "b" not in f.keyed() and f.key("b") is None
    assert set(f.keyed()) == {"a", "c"}


def test_a_site_refuses_a_key_the_server_made_and_a_key_sealed_to_another_site() -> None:
    f = Federation()
    f.run(["a", "b"])
    # The server makes its own key and "delivers" it to c, signed with a key of its own (not enrolled).
    forger = keys.generate_identity()
    hello = f.sites["c"].answer(ceremony._pack({"step": "hello", "round": 2}), "c", f.sessions["c"], None)
    c_public = ceremony._bytes(json.loads(hello), "public")
    fake = SecretKey.generate()
    sender = keys.generate()
    fingerprint = fake.public().fingerprint()
    context = (2, "a", "c", fingerprint)
    box = keys.seal(
        keys.derive(keys.agree(sender, c_public), "ckks-secret-key", context),
        fake.secret_bytes(),
        keys.frame(*context),
    )
    statement = ceremony._share_statement(2, "a", "c", keys.public_bytes(sender), box, fingerprint)
    take = {
        "step": "take",
        "round": 2,
        "sharer": "a",  # claims to come from the key holder
        "sealed": ceremony._b64(box),
        "sharer_public": ceremony._b64(keys.public_bytes(sender)),
        "fingerprint": fingerprint,
        "signature": ceremony._b64(keys.sign(forger, statement)),
    }
    with pytest.raises(UpdateError, match="refused a CKKS key"):
        f.sites["c"].answer(ceremony._pack(take), "c", f.sessions["c"], f.states["c"])
    assert f.key("c") is None

    # A real delivery sealed to b, replayed by the server to c: c cannot open it and refuses it.
    captured: dict[str, bytes] = {}

    def capture(site: str, data: bytes) -> tuple[str, bytes]:
        if json.loads(data[len(ceremony.TAG) :])["step"] == "take":
            captured[site] = data
        return site, data

    g = Federation()
    g.tamper = capture
    g.run(["a", "b", "c"])
    g.tamper = None
    g.sites["c"].answer(ceremony._pack({"step": "hello", "round": 3}), "c", g.sessions["c"], None)
    with pytest.raises(UpdateError, match="refused a CKKS key"):
        g.sites["c"].answer(captured["b"], "c", g.sessions["c"], MemorySiteState())


def test_an_unenrolled_site_is_sealed_nothing() -> None:
    f = Federation()
    stranger = Ceremony("a", {"x": keys.generate_identity()})
    f.sites["x"] = stranger
    f.states["x"] = MemorySiteState()
    f.sessions["x"] = {}
    f.run(["a", "x"])
    assert f.keyed() == ["a"] and f.key("x") is None
