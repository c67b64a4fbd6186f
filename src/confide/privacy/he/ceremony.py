"""The CKKS key ceremony: the secret key is made at a site and reaches every other site sealed to that site's
own key, through a server that relays every message and can read none.

Three steps, each one exchange over the backend (so the same code runs in a simulation and a deployment):

1. *hello*, to the sites that need the key: each answers a fresh X25519 public key, signed with its enrolled
   Ed25519 identity.
2. *share*, to one site that holds the key (the first time: the key holder, ``privacy.ckks_key_holder``, which
   makes it): it checks every hello's signature against the registry of enrolled identities, seals its key to
   each site (X25519 agreement with a fresh key of its own, HKDF-SHA256, AES-256-GCM whose associated data
   names the round, both sites and the public key's fingerprint), signs each sealed key, and returns them
   with the public key.
3. *take*, to each of those sites: it checks the sharer's signature, opens its key, checks that the key's
   public half is the one the sharer signed, keeps the key in its durable state, and answers the public key's
   fingerprint.

The server keeps the public key (checkpointed with the model, so a restarted server needs no new ceremony)
and the list of sites that confirmed the fingerprint. What a malicious server can try, and why it fails
(tests/privacy/test_ckks_ceremony.py): put its own X25519 key in place of a site's (the sharer refuses a hello
not signed by that site's identity), or hand a site a key of its own making (the site refuses a sealed key not
signed by a site of the registry).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.errors import UpdateError
from confide.pipeline import Exchange
from confide.privacy.he.ckks import PublicKey, SecretKey
from confide.privacy.secagg import keys

TAG = b"\x00confide/ckks-key/v1\x00"
"""The first bytes of every ceremony message (a site tells them from secure aggregation's)."""
PUBLIC_KEY = "ckks.public"
"""Server state: the public key's bytes."""
KEYED = "ckks.keyed"
"""Server state: the sites that confirmed they hold the key, one name per line."""
SECRET = "ckks.secret"
"""A site's durable state: its copy of the secret key."""
_EXCHANGE = "ckks.exchange"
"""A site's session: the private half of the X25519 key of its last hello."""


def to_state(data: bytes) -> np.ndarray:
    """Bytes as a float32 vector for a site's state, which keeps float32 vectors: a length, the bytes, zero
    padding, reinterpreted bit for bit (nothing converts the values, so every bit comes back)."""
    framed = len(data).to_bytes(8, "little") + data
    framed += b"\0" * (-len(framed) % 4)
    return np.frombuffer(framed, dtype=np.float32).copy()


def from_state(vector: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
    length = int.from_bytes(raw[:8], "little")
    if length > len(raw) - 8:
        raise UpdateError("the CKKS key kept in this site's state is damaged")
    return raw[8 : 8 + length]


def is_message(data: bytes) -> bool:
    return data.startswith(TAG)


def _pack(message: Mapping[str, Any]) -> bytes:
    return TAG + json.dumps(message, sort_keys=True).encode()


def _unpack(data: bytes) -> dict[str, Any]:
    """A message from the server (after its tag)."""
    return _parse(data[len(TAG) :])


def _parse(data: bytes) -> dict[str, Any]:
    """A message: a JSON object."""
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UpdateError(f"a CKKS key-ceremony message is not valid JSON ({e})") from None
    if not isinstance(message, dict):
        raise UpdateError("a CKKS key-ceremony message is not a JSON object")
    return message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bytes(message: Mapping[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(message[key], validate=True)
    except (KeyError, TypeError, ValueError):
        raise UpdateError(f"a CKKS key-ceremony message lacks a valid {key!r}") from None


def _hello_statement(round: int, site: str, public: bytes) -> bytes:
    return keys.frame(keys.PROTOCOL, "ckks-hello", round, site, public)


def _share_statement(
    round: int, sharer: str, site: str, sharer_public: bytes, sealed: bytes, fingerprint: str
) -> bytes:
    digest = hashlib.sha256(sealed).digest()
    return keys.frame(keys.PROTOCOL, "ckks-share", round, sharer, site, sharer_public, digest, fingerprint)


def _names(vector: np.ndarray | None) -> list[str]:
    if vector is None or not vector.size:
        return []
    return vector.tobytes().decode().split("\n")


class Ceremony:
    """Both halves of the ceremony. ``identities``: the signing keys of the sites this process plays (all of
    them in a simulation, one in a deployment); ``registry``: every site's enrolled identity public key, which
    the sites check signatures against (None: built from ``identities``, in a simulation)."""

    def __init__(
        self,
        holder: str,
        identities: dict[str, Ed25519PrivateKey],
        registry: Mapping[str, bytes] | None = None,
    ) -> None:
        self.holder = holder
        self.identities = identities
        self._registry = registry
        self._keys: dict[bytes, SecretKey] = {}
        """Secret keys by the SHA-256 of their bytes (simulated sites share one process and one key)."""
        self._server_key: PublicKey | None = None

    @property
    def registry(self) -> Mapping[str, bytes]:
        if self._registry is not None:
            return self._registry
        return {site: keys.identity_public_bytes(key) for site, key in self.identities.items()}

    # -- the server -----------------------------------------------------------------------------------------

    def server_key(self, server_state: Mapping[str, Any]) -> PublicKey:
        if self._server_key is None:
            held = server_state.get(PUBLIC_KEY)
            if held is None:
                raise UpdateError("no CKKS public key yet: the key ceremony has not completed")
            self._server_key = PublicKey.from_bytes(held.tobytes())
        return self._server_key

    def run(self, number: int, sites: list[str], exchange: Exchange, server_state: dict[str, Any]) -> None:
        """Give the key to ``sites`` that do not hold it yet (before round or evaluation ``number``). A site
        the ceremony does not reach cannot decrypt the model, and fails on its own; the others go on."""
        keyed = _names(server_state.get(KEYED))
        missing = [site for site in sites if site not in keyed]
        if not missing:
            return
        hello = _pack({"step": "hello", "round": number})
        hellos = dict(exchange(dict.fromkeys(missing, hello)))
        if not hellos:
            return
        first = PUBLIC_KEY not in server_state
        # The first time the key holder makes the key; after that any site that holds it can share it.
        sharers = [self.holder or min(sites)] if first else [s for s in sites if s in keyed] + keyed
        answer = None
        for sharer in dict.fromkeys(sharers):
            share = {"step": "share", "round": number, "hellos": {s: _b64(h) for s, h in hellos.items()}}
            answer = dict(exchange({sharer: _pack(share)})).get(sharer)
            if answer:
                break
        if not answer:
            return
        shared = _parse(answer)
        public = PublicKey.from_bytes(_bytes(shared, "public_key"))
        if first:
            server_state[PUBLIC_KEY] = np.frombuffer(public.to_bytes(), dtype=np.uint8).copy()
            self._server_key = public
        elif public.fingerprint() != self.server_key(server_state).fingerprint():
            raise UpdateError(f"site {sharer!r} shared a CKKS key other than the federation's")
        sealed = shared.get("sealed", {})
        takes = {
            site: _pack({"step": "take", "round": number, "sharer": sharer, **sealed[site]})
            for site in hellos
            if isinstance(sealed, dict) and site in sealed
        }
        fingerprint = public.fingerprint()
        for site, reply in exchange(takes):
            if _parse(reply).get("fingerprint") == fingerprint:
                keyed.append(site)
        server_state[KEYED] = np.frombuffer("\n".join(keyed).encode(), dtype=np.uint8).copy()

    # -- a site ---------------------------------------------------------------------------------------------

    def answer(self, data: bytes, site: str, sessions: dict[str, Any], state: Any) -> bytes:
        message = _unpack(data)
        step = message.get("step")
        round = message.get("round")
        if not isinstance(round, int):
            raise UpdateError("a CKKS key-ceremony message lacks its round")
        if step == "hello":
            return self._hello(round, site, sessions)
        if step == "share":
            return self._share(round, site, message, state)
        if step == "take":
            return self._take(round, site, message, sessions, state)
        raise UpdateError(f"a CKKS key-ceremony message has an unknown step {step!r}")

    def _identity(self, site: str) -> Ed25519PrivateKey:
        identity = self.identities.get(site)
        if identity is None:
            raise UpdateError(
                f"site {site!r} has no identity key to sign its part of the CKKS key ceremony: make its keys "
                "with `confide keys` and enroll it with --csr"
            )
        return identity

    def _hello(self, round: int, site: str, sessions: dict[str, Any]) -> bytes:
        private = keys.generate()
        sessions[_EXCHANGE] = private
        public = keys.public_bytes(private)
        signature = keys.sign(self._identity(site), _hello_statement(round, site, public))
        return json.dumps({"public": _b64(public), "signature": _b64(signature)}).encode()

    def _share(self, round: int, sharer: str, message: Mapping[str, Any], state: Any) -> bytes:
        held = state.get(sharer, SECRET) if state is not None else None
        if held is None:
            if sharer != (self.holder or sharer):
                raise UpdateError(f"site {sharer!r} holds no CKKS key to share and is not the key holder")
            key = SecretKey.generate()
            if state is not None:
                state.put(sharer, SECRET, round, to_state(key.secret_bytes()))
        else:
            key = self._load(from_state(held))
        secret, fingerprint = key.secret_bytes(), key.public().fingerprint()
        private = keys.generate()
        sharer_public = keys.public_bytes(private)
        sealed: dict[str, dict[str, str]] = {}
        hellos = message.get("hellos")
        if not isinstance(hellos, dict):
            raise UpdateError("a CKKS share request lacks the sites' hellos")
        for site, hello_b64 in hellos.items():
            try:
                hello = json.loads(base64.b64decode(hello_b64))
                public, signature = _bytes(hello, "public"), _bytes(hello, "signature")
                keys.verify(self.registry[site], signature, _hello_statement(round, site, public))
                shared = keys.agree(private, public)
            except (KeyError, ValueError, InvalidSignature, UpdateError):
                continue  # not that site's own key (or not an enrolled site): it gets nothing
            context = (round, sharer, site, fingerprint)
            box = keys.seal(keys.derive(shared, "ckks-secret-key", context), secret, keys.frame(*context))
            signature = keys.sign(
                self._identity(sharer), _share_statement(round, sharer, site, sharer_public, box, fingerprint)
            )
            sealed[site] = {
                "sealed": _b64(box),
                "sharer_public": _b64(sharer_public),
                "fingerprint": fingerprint,
                "signature": _b64(signature),
            }
        return json.dumps({"public_key": _b64(key.public().to_bytes()), "sealed": sealed}).encode()

    def _take(
        self, round: int, site: str, message: Mapping[str, Any], sessions: dict[str, Any], state: Any
    ) -> bytes:
        sharer, fingerprint = message.get("sharer"), message.get("fingerprint")
        private = sessions.pop(_EXCHANGE, None)
        if not isinstance(sharer, str) or not isinstance(fingerprint, str) or private is None:
            raise UpdateError(f"site {site!r} got a CKKS key it did not ask for")
        box, sharer_public = _bytes(message, "sealed"), _bytes(message, "sharer_public")
        statement = _share_statement(round, sharer, site, sharer_public, box, fingerprint)
        try:
            keys.verify(self.registry[sharer], _bytes(message, "signature"), statement)
            context = (round, sharer, site, fingerprint)
            shared = keys.agree(private, sharer_public)
            secret = keys.unseal(keys.derive(shared, "ckks-secret-key", context), box, keys.frame(*context))
        except (KeyError, ValueError, InvalidSignature, InvalidTag):
            raise UpdateError(
                f"site {site!r} refused a CKKS key: it is not sealed to this site and signed by an enrolled "
                f"site (said to be {sharer!r})"
            ) from None
        key = self._load(secret)
        if key.public().fingerprint() != fingerprint:
            raise UpdateError(f"site {site!r} refused a CKKS key whose public half is not the one signed")
        if state is not None:
            state.put(site, SECRET, round, to_state(secret))
        return json.dumps({"fingerprint": fingerprint}).encode()

    def _load(self, secret: bytes) -> SecretKey:
        digest = hashlib.sha256(secret).digest()
        if digest not in self._keys:
            self._keys[digest] = SecretKey.from_secret_bytes(secret)
        return self._keys[digest]

    def secret_key(self, site: str, state: Any) -> SecretKey:
        held = state.get(site, SECRET) if state is not None else None
        if held is None:
            raise UpdateError(
                f"site {site!r} holds no CKKS key, so it cannot decrypt the model: the key ceremony has not "
                "reached it (is the key holder or another site that holds the key online?)"
            )
        return self._load(from_state(held))
