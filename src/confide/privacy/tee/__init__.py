"""Trusted execution: attestation verifiers and the attested aggregator."""
