"""Homomorphic encryption: CKKS vectors, the key ceremony at the sites, and the layer that uses them."""
