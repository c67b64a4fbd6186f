"""Privacy layers: what keeps a site's data and its own update from the server and the other sites.

``dp`` holds the mechanisms of DP-FedAvg (McMahan et al. 2018): per-site clipping, noise added centrally or
split across the sites, and adaptive clipping (Andrew et al. 2021); ``accountant`` turns what ran into an
(epsilon, delta) guarantee with Google's dp-accounting; ``policy`` ties them to a run. ``secagg`` is secure
aggregation (Bonawitz et al. 2017 with the SecAgg+ graph of Bell et al. 2020): primitives, the protocol's
state machines and its messages. All of it is pure: no files, sockets, clocks or printing.
"""
