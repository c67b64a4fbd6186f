"""CKKS homomorphic encryption of flat vectors, with TenSEAL (Microsoft SEAL underneath).

CKKS (Cheon, Kim, Kim and Song 2017) encrypts vectors of real numbers approximately, and lets whoever holds
only the public part of the key add ciphertexts. That is all the server needs: it adds the sites' encrypted
updates into the encrypted global model and never decrypts anything.

The parameters (:data:`PARAMS`) are chosen for that use and nothing more:

* polynomial degree N = 4096 (2048 values per ciphertext) and a coefficient modulus of 60 + 40 bits: 100 bits
  in total, under the 109 bits that the Homomorphic Encryption Standard (Albrecht et al. 2018) allows for
  128-bit security at N = 4096 (SEAL checks this when it builds the context);
* no multiplicative depth: ciphertexts stay at their one data level (the 60-bit prime; the 40-bit one is
  SEAL's special prime for key switching). The server only adds, so no level is ever spent, and a ciphertext
  costs 2 x 4096 x 8 bytes for 2048 values: 32 bytes per value, 8 times a float32;
* scale 2^40: values up to 2^19 in magnitude, and an error near 1e-8 per encryption, which grows with the
  number of ciphertexts added (below 1e-6 after a thousand: tests/privacy/test_ckks.py checks both).

Keys: :class:`SecretKey` is a TenSEAL context with the secret key (only the sites hold it); its
:meth:`~SecretKey.public` half holds the public key and no secret, and is all the server gets. Keys are
drawn by SEAL from the OS's randomness.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from confide.core import ENCRYPTED_MAGIC, Vector
from confide.errors import UpdateError

ENCRYPTED_MODEL = (
    "this run's global model is encrypted with CKKS (privacy.encryption = 'ckks'): its server never holds "
    "it in clear, and only the sites hold the key that decrypts it"
)
"""What a user is told who asks a server for a model it cannot read."""

MAGIC = ENCRYPTED_MAGIC
"""The first bytes of an encrypted vector, so that a clear vector is never taken for one."""


@dataclass(frozen=True)
class CKKSParams:
    poly_degree: int = 4096
    coeff_bits: tuple[int, ...] = (60, 40)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Values one ciphertext carries."""
        return self.poly_degree // 2

    @property
    def largest(self) -> float:
        """The largest magnitude a value (or a sum of values) may reach: scale times it must stay below half
        the data modulus."""
        return 2.0 ** (self.params_room - 1)

    @property
    def params_room(self) -> int:
        return self.coeff_bits[0] - self.scale_bits

    def describe(self) -> str:
        return (
            f"CKKS, N = {self.poly_degree}, coefficient modulus {'+'.join(map(str, self.coeff_bits))} bits, "
            f"scale 2^{self.scale_bits}: 128-bit security (HE Standard)"
        )


PARAMS = CKKSParams()


def _context(params: CKKSParams) -> ts.Context:
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_degree, coeff_mod_bit_sizes=list(params.coeff_bits))
    context.global_scale = 2.0**params.scale_bits
    return context


class PublicKey:
    """The public half of a CKKS key: it encrypts and adds, and cannot decrypt. The server holds this."""

    def __init__(self, context: ts.Context, params: CKKSParams) -> None:
        if context.has_secret_key():
            raise ValueError("a public key must not hold the secret key")
        self.context = context
        self.params = params

    @classmethod
    def from_bytes(cls, data: bytes, params: CKKSParams = PARAMS) -> PublicKey:
        try:
            context = ts.context_from(data)
        except Exception as e:  # TenSEAL raises bare ValueErrors and C++ exceptions for damaged bytes
            raise UpdateError(f"the CKKS public key is damaged or not a CKKS key ({e})") from None
        if context.has_secret_key():
            raise UpdateError("the CKKS 'public' key holds the secret key: the server must never receive it")
        return cls(context, params)

    def to_bytes(self) -> bytes:
        return bytes(
            self.context.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
            )
        )

    def fingerprint(self) -> str:
        """SHA-256 of the public key's bytes, hex: what the sites check the server holds their key."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def encrypt(self, vector: Vector) -> EncryptedVector:
        """``vector`` encrypted, cut into as many ciphertexts as the slots need."""
        values = np.asarray(vector, dtype=np.float64)
        if values.size and not float(np.max(np.abs(values))) < self.params.largest:
            raise ValueError(
                f"a value is too large or not finite for CKKS at scale 2^{self.params.scale_bits} (the "
                f"largest is {self.params.largest:g})"
            )
        slots = self.params.slots
        parts = [ts.ckks_vector(self.context, values[i : i + slots]) for i in range(0, values.size, slots)]
        return EncryptedVector(parts, values.size, self.params)

    def load(self, data: bytes, size: int) -> EncryptedVector:
        """An encrypted vector of ``size`` values from its bytes; UpdateError for anything else (a truncated,
        malformed or mis-sized payload, a ciphertext of other parameters)."""
        blobs = _unframe(data)
        slots = self.params.slots
        expected = -(-size // slots)
        if len(blobs) != expected:
            raise UpdateError(
                f"an encrypted vector of {size} values has {expected} ciphertexts, this one has {len(blobs)}"
            )
        parts = []
        for i, blob in enumerate(blobs):
            try:
                part = ts.ckks_vector_from(self.context, blob)
            except Exception as e:
                raise UpdateError(f"ciphertext {i} of an encrypted vector is malformed ({e})") from None
            if part.size() != min(slots, size - i * slots):
                raise UpdateError(f"ciphertext {i} of an encrypted vector holds {part.size()} values")
            parts.append(part)
        return EncryptedVector(parts, size, self.params)


class SecretKey(PublicKey):
    """A whole CKKS key: it decrypts. Only the sites hold it; it never leaves them in clear."""

    def __init__(self, context: ts.Context, params: CKKSParams) -> None:
        if not context.has_secret_key():
            raise ValueError("a secret key needs the secret part")
        self.context = context
        self.params = params

    @classmethod
    def generate(cls, params: CKKSParams = PARAMS) -> SecretKey:
        """A fresh key (SEAL draws it from the OS's randomness)."""
        return cls(_context(params), params)

    @classmethod
    def from_secret_bytes(cls, data: bytes, params: CKKSParams = PARAMS) -> SecretKey:
        try:
            context = ts.context_from(data)
        except Exception as e:
            raise ValueError(f"the CKKS secret key is damaged ({e})") from None
        return cls(context, params)

    def secret_bytes(self) -> bytes:
        return bytes(
            self.context.serialize(
                save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
        )

    def public(self) -> PublicKey:
        return PublicKey(ts.context_from(self.to_bytes()), self.params)

    def decrypt(self, data: bytes, size: int) -> np.ndarray:
        """The float64 values of the encrypted vector in ``data``."""
        return self.load(data, size).decrypt()


class EncryptedVector:
    """A vector as CKKS ciphertexts of at most ``slots`` values each, in order."""

    def __init__(self, parts: list[ts.CKKSVector], size: int, params: CKKSParams) -> None:
        self.parts = parts
        self.size = size
        self.params = params

    def __iadd__(self, other: EncryptedVector) -> EncryptedVector:
        if other.size != self.size:
            raise UpdateError(f"cannot add an encrypted vector of {other.size} values to one of {self.size}")
        for i, (mine, theirs) in enumerate(zip(self.parts, other.parts, strict=True)):
            try:
                mine += theirs
            except Exception as e:  # a ciphertext at another scale or level (SEAL: "scale mismatch")
                raise UpdateError(f"ciphertext {i} cannot be added to the sum ({e})") from None
        return self

    def to_bytes(self) -> bytes:
        return _frame([part.serialize() for part in self.parts])

    def decrypt(self) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float64)
        slots = self.params.slots
        for i, part in enumerate(self.parts):
            out[i * slots : i * slots + part.size()] = part.decrypt()
        return out


def _frame(blobs: list[bytes]) -> bytes:
    out = bytearray(MAGIC + struct.pack("<I", len(blobs)))
    for blob in blobs:
        out += struct.pack("<I", len(blob)) + blob
    return bytes(out)


def _unframe(data: bytes) -> list[bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise UpdateError("the payload is not an encrypted vector (no CKKS header)")
    (count,) = struct.unpack_from("<I", data, len(MAGIC))
    at = len(MAGIC) + 4
    blobs = []
    for i in range(count):
        if at + 4 > len(data):
            raise UpdateError(f"the encrypted vector is truncated before ciphertext {i} of {count}")
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + length > len(data):
            raise UpdateError(f"the encrypted vector is truncated inside ciphertext {i} of {count}")
        blobs.append(data[at : at + length])
        at += length
    if at != len(data):
        raise UpdateError(f"the encrypted vector has {len(data) - at} bytes after its last ciphertext")
    return blobs
