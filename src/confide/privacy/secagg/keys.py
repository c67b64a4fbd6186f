"""Key agreement, key derivation, authenticated encryption and signatures, all from ``cryptography``.

- X25519 (RFC 7748) for the two per-round key pairs of each site: one to encrypt the shares it sends, one
  whose agreement with a neighbour seeds their pairwise mask.
- HKDF-SHA256 (RFC 5869) turns a shared secret into a key for one purpose; the ``info`` string names the
  protocol, the purpose and the context (session, round, the two sites), each length-prefixed, so no two
  purposes or pairs can ever derive the same key.
- AES-256-GCM encrypts shares between sites; the associated data binds sender, receiver, session and round, so
  a ciphertext moved to another pair or another round fails to decrypt.
- Ed25519 signs, with a site's long-term identity in the authenticated mode, its advertised keys and the
  survivor set it agrees to unmask.

Fresh key pairs are drawn every round (``X25519PrivateKey.generate`` uses the OS's randomness).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"confide/secagg/v1"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
TAG_BYTES = 16

Context = bytes | str | int


def frame(*items: Context) -> bytes:
    """An unambiguous encoding of ``items``: each one length-prefixed (text as UTF-8, integers as 8 bytes)."""
    out = bytearray()
    for item in items:
        if isinstance(item, str):
            data = item.encode()
        elif isinstance(item, int):
            data = struct.pack("<q", item)
        else:
            data = bytes(item)
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def generate() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


def agree(key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret with ``peer_public``; ValueError for a malformed or low-order public key."""
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    # cryptography refuses the all-zero shared secret that low-order points produce.
    return key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def check_public(public: bytes) -> None:
    """ValueError unless ``public`` is an X25519 public key that a key agreement accepts (not low-order).

    Any private key shows it (a low-order point gives the all-zero secret whatever the scalar), so a fixed one
    is used and the secret is thrown away."""
    agree(X25519PrivateKey.from_private_bytes(b"\x01" * KEY_BYTES), public)


def derive(shared: bytes, purpose: str, context: Iterable[Context]) -> bytes:
    """A 32-byte key for ``purpose`` in ``context`` from a shared secret (HKDF-SHA256)."""
    info = frame(PROTOCOL, purpose, *context)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce, then the ciphertext and its 16-byte tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`; ``cryptography.exceptions.InvalidTag`` if anything was changed."""
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)


def sealed_size(plaintext_bytes: int) -> int:
    return NONCE_BYTES + plaintext_bytes + TAG_BYTES


def generate_identity() -> Ed25519PrivateKey:
    """A long-term Ed25519 identity for a site; its public half is registered with the federation."""
    return Ed25519PrivateKey.generate()


def identity_public_bytes(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_statement(
    nonce: bytes,
    round: int,
    digest: bytes,
    site: str,
    cipher_key: bytes,
    mask_key: bytes,
    contribution: bytes,
) -> bytes:
    """What a site signs when it advertises its keys: they and its session contribution are its own, for
    this attempt at this round only, after it saw the commitments ``digest`` (so two sites that were shown
    different commitment lists cannot accept each other's keys)."""
    return frame(PROTOCOL, "advertise", nonce, round, digest, site, cipher_key, mask_key, contribution)


def consistency_statement(session: bytes, round: int, survivors: Iterable[str]) -> bytes:
    """What a site signs in the consistency step: the one survivor set it will reveal shares for."""
    return frame(PROTOCOL, "consistency", session, round, *sorted(survivors))


def sign(identity: Ed25519PrivateKey, statement: bytes) -> bytes:
    return identity.sign(statement)


def verify(identity_public: bytes, signature: bytes, statement: bytes) -> None:
    """Raises ``cryptography.exceptions.InvalidSignature`` unless ``signature`` is the identity's."""
    Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, statement)
