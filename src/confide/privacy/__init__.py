"""Differential privacy: clipping and Gaussian noise as layers, and the accountant that adds up their cost.

``dp`` holds the mechanisms of DP-FedAvg (McMahan et al. 2018): per-site clipping, noise added centrally or
split across the sites, and adaptive clipping (Andrew et al. 2021). ``accountant`` turns what ran into an
(epsilon, delta) guarantee with Google's dp-accounting. Both are pure: no files, clocks or printing.
"""
