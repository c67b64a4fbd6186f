"""confide makes torch's OpenMP threads sleep, not spin, while they wait (benchmarks/busy.py)."""

import os
import subprocess
import sys

SHOW = "import confide, os, torch; print(os.environ['OMP_WAIT_POLICY'])"


def policy(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_importing_confide_before_torch_makes_waiting_threads_sleep() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert policy(env) == "PASSIVE"


def test_a_wait_policy_the_user_set_is_kept() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert policy(env | {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
