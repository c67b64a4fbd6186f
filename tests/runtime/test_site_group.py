"""A process hosting many sites (`confide client --site A --site B ...`): what the sites of a group share."""

from __future__ import annotations

import threading
from pathlib import Path

from confide.runtime.grpc.client import SiteGroup
from confide.runtime.grpc.security import Credentials, create_certificates


def credentials(tmp_path: Path, site: str, certificate: bool = False) -> Credentials:
    ca = tmp_path / "deploy"
    if not (ca / "ca.pem").exists():
        create_certificates(ca, ["localhost"])
    pem = (ca / "ca.pem").read_bytes()
    if certificate:  # any PEM stands for a client certificate here: only its presence matters to the group
        return Credentials(site=site, ca_pem=pem, cert_pem=pem, key_pem=b"key")
    return Credentials(site=site, ca_pem=pem, token="cfd_" + "t" * 43)


def test_the_sites_of_a_group_build_one_kit_and_compute_on_one_thread(tmp_path: Path) -> None:
    group = SiteGroup()
    built: list[int] = []

    def build() -> object:
        built.append(1)
        return object()

    try:
        kits = [group.kit(("config", 6), build) for _ in range(3)]
        assert len(built) == 1 and kits[0] is kits[1] is kits[2]  # parsed and built once for every site
        threads = {group.run(threading.get_ident) for _ in range(5)}
        assert len(threads) == 1 and threading.get_ident() not in threads
    finally:
        group.close()


def test_token_sites_share_one_connection_and_certificate_sites_have_their_own(tmp_path: Path) -> None:
    group = SiteGroup()
    try:
        a = group.channel("localhost:1", credentials(tmp_path, "a"))
        b = group.channel("localhost:1", credentials(tmp_path, "b"))
        assert a is not None and a is b
        assert group.channel("localhost:1", credentials(tmp_path, "c", certificate=True)) is None
    finally:
        group.close()
    separate = SiteGroup(share_connection=False)
    try:
        assert separate.channel("localhost:1", credentials(tmp_path, "a")) is None
    finally:
        separate.close()


def test_one_site_at_a_time_holds_the_model_and_at_most_two_answers_upload(tmp_path: Path) -> None:
    group = SiteGroup()
    try:
        assert group.turn.acquire(blocking=False)
        assert not group.turn.acquire(blocking=False)  # another site waits for the model
        group.turn.release()
        assert group.uploads.acquire(blocking=False) and group.uploads.acquire(blocking=False)
        assert not group.uploads.acquire(blocking=False)  # a third finished answer waits to upload
    finally:
        group.close()
