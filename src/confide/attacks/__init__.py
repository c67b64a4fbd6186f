"""Simulated poisoning: some sites attack the federation, so that its defences can be measured.

Simulation only: :func:`confide.config.check_deployment` refuses ``[attack]`` in a deployment. Threat model:
an attacking site controls everything on its own side. It trains on data of its choosing (the data
attacks of :mod:`.data`: a trigger backdoor, next-character flipping), sends any vector it likes in place of
its honest update (the model attacks of :mod:`.model`), and leaves out the site-side clipping and noise that
honest sites apply (unless ``attack.honest_layers``). It cannot change what the server does: the server's
own checks (clipping again where it reads updates, validation, robust aggregation) still apply to it, and
under secure aggregation it must still mask its input for the sum to unmask. With ``attack.collude`` the
attackers coordinate: within a round they pool what they know of their honest updates.

* :mod:`.sites` draws the attacking sites once from the run's seed (a public stream: the simulation's
  attackers are part of its config, not a secret).
* :mod:`.model` holds one small class per model attack: a pure function of the attacker's honest update and
  its coalition's pool.
* :mod:`.layer` is the pipeline layer (first in :data:`confide.registry.LAYERS`) that applies it.
* :mod:`.data` rewrites the attackers' training windows once, when the run is built.
* :mod:`.measure` measures the backdoor's attack success on honest sites' held-out text.
"""

from __future__ import annotations

from confide.attacks.sites import attackers_of, expected_per_round

__all__ = ["attackers_of", "expected_per_round"]
