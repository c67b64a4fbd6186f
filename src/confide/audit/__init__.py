"""Audits of what a trained model gives away: canary exposure (Carlini et al. 2019).

Pure functions over a scoring function the caller supplies, so an audit runs the same on any model.
"""
