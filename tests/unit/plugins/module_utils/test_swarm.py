"""The swarm of an artifact: its metadata and the checks of metadata read from KV, peers,
real libtorrent sessions on 127.0.0.1 (one seed, two leechers, peers connected explicitly),
and how often a download writes its progress."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _swarm, _swarm_worker
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    ReleaseArtifact,
    ReleaseFilters,
    ReleaseRecord,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ArtifactConfig
from ansible_collections.fireap.consul.plugins.module_utils._swarm import (
    Swarm,
    SwarmError,
    check_metadata,
    create_metadata,
    endpoint_order,
    piece_size,
    staging_dir,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    PIECE_MAX,
    PIECE_MIN,
    PIECES_MAX,
    check_endpoint,
    check_ip,
    check_peers,
    endpoint,
)

RUN_ID = "0123456789abcdef0123456789abcdef"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(name="artifact")
def artifact_fixture(tmp_path):
    """A 300 KB build on the seed's side (5 pieces of 64 KiB)."""
    path = tmp_path / "seed" / "app-1.0.tar.gz"
    path.parent.mkdir()
    path.write_bytes(os.urandom(300_000))
    return str(path)


def info_dict(name=b"app-1.0.tar.gz", length=300_000, piece=PIECE_MIN, pieces=None, extra=None):
    """A bencoded info dict as an attacker could write it (``extra``: more keys), with its info-hash."""
    if pieces is None:
        pieces = b"\0" * 20 * -(-length // piece)
    fields = {b"name": name, b"length": length, b"piece length": piece, b"pieces": pieces, **(extra or {})}
    data = _swarm._bencode(fields)
    return data, hashlib.sha1(data).hexdigest()


def test_piece_size_is_the_smallest_power_of_two_that_bounds_the_piece_count():
    assert piece_size(1) == PIECE_MIN
    assert piece_size(PIECE_MIN * PIECES_MAX) == PIECE_MIN
    assert piece_size(PIECE_MIN * PIECES_MAX + 1) == 2 * PIECE_MIN
    assert piece_size(PIECE_MAX * PIECES_MAX) == PIECE_MAX
    with pytest.raises(ValueError, match="artifact size"):
        piece_size(PIECE_MAX * PIECES_MAX + 1)


def test_metadata_round_trip(artifact):
    metadata = create_metadata(artifact)
    assert (metadata.name, metadata.length, metadata.piece_length, metadata.pieces) == (
        "app-1.0.tar.gz", 300_000, PIECE_MIN, 5)
    assert metadata.info_hash == hashlib.sha1(metadata.info).hexdigest()
    assert len(metadata.info) < 1024
    again = check_metadata(metadata.info, name="app-1.0.tar.gz", length=300_000, info_hash=metadata.info_hash)
    assert again == metadata


def test_the_largest_metadata_fits_one_kv_value_even_base64_encoded():
    name = "a" * 255
    data, info_hash = info_dict(name=name.encode(), length=PIECE_MAX * PIECES_MAX, piece=PIECE_MAX)
    assert check_metadata(data, name=name, length=PIECE_MAX * PIECES_MAX, info_hash=info_hash).pieces == PIECES_MAX
    assert len(data) <= _swarm.METADATA_MAX and _swarm.METADATA_MAX * 4 // 3 + 4 < 512 * 1024


def test_metadata_of_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(SwarmError, match="cannot read the artifact"):
        create_metadata(str(tmp_path / "missing"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SwarmError, match="has 0 bytes"):
        create_metadata(str(tmp_path / "empty"))


@pytest.mark.parametrize("fields, expected", [
    ({"name": b"other.tar.gz"}, "names the file 'other.tar.gz'"),
    ({"name": b"../app-1.0.tar.gz"}, "names no file of its own directory"),
    ({"name": b"/etc/app-1.0.tar.gz"}, "names no file of its own directory"),
    ({"name": b".."}, "names no file of its own directory"),
    ({"name": b"\xff"}, "names no file of its own directory"),
    ({"length": 300_001}, "gives the length 300001"),
    ({"piece": 100_000}, "must be a power of two"),
    ({"piece": 2 * PIECE_MAX}, "must be a power of two"),
    ({"piece": 32 * 1024}, "must be a power of two"),
    ({"pieces": b"\0" * 19 * 5}, "must hold 5 piece hashes"),
    ({"extra": {b"files": [{b"length": 1, b"path": [b"x"]}]}}, "several files"),
    ({"extra": {b"private": 1}}, "exactly the keys"),
])
def test_metadata_from_kv_that_breaks_a_rule_is_refused(fields, expected):
    data, info_hash = info_dict(**fields)
    with pytest.raises(SwarmError, match=expected):
        check_metadata(data, name="app-1.0.tar.gz", length=300_000, info_hash=info_hash)


def test_metadata_whose_hash_is_not_the_releases_is_refused():
    data, info_hash = info_dict()
    other = ("0" if info_hash[0] != "0" else "1") + info_hash[1:]
    with pytest.raises(SwarmError, match=f"has the info-hash {info_hash}, the release {other}"):
        check_metadata(data, name="app-1.0.tar.gz", length=300_000, info_hash=other)


@pytest.mark.parametrize("data, expected", [
    (b"d" + b"0:" * (_swarm.METADATA_MAX // 2) + b"e", "at most"),
    (b"l4:spame", "one canonically bencoded dict"),
    (b"d4:name3:abce", "exactly the keys"),
    (b"d4:name3:abc", "not bencoded: metadata ends inside a list or dict"),
    (b"d4:name9:abce", "not bencoded: metadata ends inside a string"),
    (b"d4:name3:abc6:length3:abce", "not one canonically"),  # keys out of order
    (b"d6:lengthi01ee", "not one canonically"),
    (b"d6:lengthix1ee", "not bencoded: metadata holds a malformed integer"),
    (b"d6:lengthi" + b"1" * 30 + b"ee", "not bencoded: metadata holds a malformed integer"),
    (b"d1:al" * 10 + b"e", "not bencoded: metadata nests too deep"),
    (b"di1ei2ee", "not bencoded: metadata holds a malformed dict"),
    (b"d4:namex3:abce", "not bencoded: metadata holds a malformed string"),
    ("d4:name3:abce", "must be bytes"),
])
def test_metadata_that_is_not_one_bounded_canonical_dict_is_refused(data, expected):
    with pytest.raises(SwarmError, match=expected):
        check_metadata(data, name="app-1.0.tar.gz", length=300_000, info_hash="0" * 40)


def test_the_releases_own_values_are_checked_too():
    data, info_hash = info_dict()
    with pytest.raises(ValueError, match="40 lowercase hex digits"):
        check_metadata(data, name="app-1.0.tar.gz", length=300_000, info_hash=info_hash.upper())
    with pytest.raises(ValueError, match="artifact size"):
        check_metadata(data, name="app-1.0.tar.gz", length=0, info_hash=info_hash)
    with pytest.raises(ValueError, match="one path component"):
        check_metadata(data, name="a/b", length=300_000, info_hash=info_hash)


def test_peers_are_ip_literals_and_swarm_ports_written_one_way():
    assert check_endpoint("10.0.0.7:6881") == ("10.0.0.7", 6881)
    assert check_endpoint("[fd00::1]:1024") == ("fd00::1", 1024)
    for value in ("node-1.example.com:6881", "10.0.0.7%eth0:6881", "[fe80::1%eth0]:6881", ":6881", None,
                  "10.0.0.256:6881"):
        with pytest.raises(ValueError, match="must be|non-empty string"):
            check_endpoint(value)
    for value in ("10.0.0.7:1023", "10.0.0.7:65536", "10.0.0.7:", "10.0.0.7", "10.0.0.7:+6881", "10.0.0.7:0006881"):
        with pytest.raises(ValueError, match="swarm port|ADDRESS:PORT"):
            check_endpoint(value)
    for value in ("[fd00::0:1]:6881", "fd00::1:6881", "010.0.0.7:6881"):
        with pytest.raises(ValueError, match="must be written|unicast IP address"):
            check_endpoint(value)
    assert check_peers(["10.0.0.7:6881"] * 1) == ("10.0.0.7:6881",)
    for value in ([f"10.0.0.{index}:6881" for index in range(9)], ["10.0.0.7:6881"] * 2, "10.0.0.7:6881", {}):
        with pytest.raises(ValueError, match="swarm peers"):
            check_peers(value)


def test_a_swarm_address_is_one_node_never_every_interface_or_a_group():
    assert check_ip("127.0.0.2") == "127.0.0.2"
    assert check_ip("fe80::1") == "fe80::1"
    for value in ("0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "240.0.0.1", "::ffff:10.0.0.7"):
        with pytest.raises(ValueError, match="unicast IP address"):
            check_ip(value)
        with pytest.raises(ValueError, match="unicast IP address"):
            check_endpoint(endpoint(value, 6881))


def test_the_staging_dir_is_under_the_artifacts_dir_and_named_by_a_valid_app_and_run_id():
    assert staging_dir("/srv/builds/app-1.tar.gz", "app", RUN_ID) == f"/srv/builds/.fireap-swarm/app/{RUN_ID}"
    with pytest.raises(ValueError, match="run id"):
        staging_dir("/srv/builds/app-1.tar.gz", "app", "../x")
    with pytest.raises(ValueError, match="app"):
        staging_dir("/srv/builds/app-1.tar.gz", "..", RUN_ID)


def test_a_download_removes_what_a_killed_worker_of_the_app_left_and_no_other_apps(artifact, tmp_path, swarms):
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    target = tmp_path / "node" / "app-1.0.tar.gz"
    earlier = tmp_path / "node" / ".fireap-swarm" / "app" / ("f" * 32)
    other_app = tmp_path / "node" / ".fireap-swarm" / "other" / RUN_ID
    for folder in (earlier, other_app):
        folder.mkdir(parents=True)
        (folder / "app-0.9.tar.gz").write_bytes(b"half a download")
    swarms[0].seed(metadata, artifact)
    swarms[1].connect([f"127.0.0.1:{swarms[0].port}"])
    assert swarms[1].fetch(metadata, str(target), digest(build), RUN_ID, app="app", timeout=60) == len(build)
    assert not (tmp_path / "node" / ".fireap-swarm" / "app").exists()
    assert (other_app / "app-0.9.tar.gz").read_bytes() == b"half a download"


def test_a_swarm_listens_on_the_address_it_is_given_at_the_port_it_reports():
    swarm = Swarm("127.0.0.1", 0, 2)
    try:
        assert 0 < swarm.port < 65536
    finally:
        swarm.close()
    with pytest.raises(SwarmError, match=r"cannot listen on 192\.0\.2\.1:0"):
        Swarm("192.0.2.1", 0, 2)  # an address of no interface here: nothing is sent


def test_a_swarm_listens_on_its_own_port_or_not_at_all():
    """A port in use fails the swarm: peers look for the node at the port it advertised only."""
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SwarmError, match=f"cannot listen on 127\\.0\\.0\\.1:{port}"):
            Swarm("127.0.0.1", port, 2)
    finally:
        taken.close()


def test_a_closed_swarm_frees_its_port_at_once():
    """A worker's next run listens on the port the last one closed, with the old object alive."""
    first = Swarm("127.0.0.1", 0, 2)
    port = first.port
    first.close()
    first.close()
    again = Swarm("127.0.0.1", port, 2)
    try:
        assert again.port == port and not first.seeding
    finally:
        again.close()


@pytest.fixture(name="swarms")
def swarms_fixture():
    """Three sessions on 127.0.0.1, each on a port of its own."""
    swarms = [Swarm("127.0.0.1", 0, 2) for index in range(3)]
    yield swarms
    for swarm in swarms:
        swarm.close()


def test_two_leechers_fetch_the_artifact_from_one_seed_and_each_other(artifact, tmp_path, swarms):
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    seed, *leechers = swarms
    seed.seed(metadata, artifact)
    endpoints = [f"127.0.0.1:{swarm.port}" for swarm in swarms]
    for swarm in swarms:
        swarm.connect(endpoints)
    targets = [str(tmp_path / f"node-{index}" / "app-1.0.tar.gz") for index in range(2)]
    errors = []

    def fetch(swarm, target):
        try:
            swarm.fetch(metadata, target, digest(build), RUN_ID, app="app", timeout=60)
        except SwarmError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=pair) for pair in zip(leechers, targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors
    for target in targets:
        with open(target, "rb") as stream:
            assert stream.read() == build
        assert not os.path.exists(os.path.join(os.path.dirname(target), ".fireap-swarm"))


def test_a_download_whose_checksum_is_not_the_releases_never_lands(artifact, tmp_path, swarms):
    metadata = create_metadata(artifact)
    seed, leecher = swarms[:2]
    seed.seed(metadata, artifact)
    leecher.connect([f"127.0.0.1:{seed.port}"])
    target = tmp_path / "node" / "app-1.0.tar.gz"
    with pytest.raises(SwarmError, match="not the release's: checksum mismatch"):
        leecher.fetch(metadata, str(target), digest(b"another build"), RUN_ID, app="app", timeout=60)
    assert not target.exists()
    assert not (target.parent / ".fireap-swarm").exists()


def test_a_download_without_peers_times_out_and_leaves_nothing(artifact, tmp_path, swarms):
    metadata = create_metadata(artifact)
    target = tmp_path / "node" / "app-1.0.tar.gz"
    with pytest.raises(SwarmError, match=r"did not arrive from the swarm within 1 s \(0% of 300000 bytes; connected to 0 of the 0 peers "):
        swarms[1].fetch(metadata, str(target), digest(b"x"), RUN_ID, app="app", timeout=1)
    assert not target.exists()
    assert not (target.parent / ".fireap-swarm").exists()


def test_a_file_already_in_place_with_the_checksum_is_served_without_a_download(artifact, tmp_path, swarms):
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    holder, leecher = swarms[1:]
    assert holder.fetch(metadata, artifact, digest(build), RUN_ID, app="app", timeout=1) == 0
    assert not os.path.exists(os.path.join(os.path.dirname(artifact), ".fireap-swarm"))
    leecher.connect([f"127.0.0.1:{holder.port}"])
    target = tmp_path / "node" / "app-1.0.tar.gz"
    seen = []
    assert leecher.fetch(metadata, str(target), digest(build), RUN_ID, app="app", timeout=60,
                         progress=lambda done, rate: seen.append((done, rate))) == len(build)
    assert target.read_bytes() == build
    # The download reports what it holds at each poll, up to the whole file.
    assert [done for done, _rate in seen] == sorted(done for done, _rate in seen)
    assert seen[-1][0] == len(build) and all(rate >= 0 for _done, rate in seen)


def test_a_rate_limit_caps_the_swarm_even_between_peers_on_one_machine(artifact, tmp_path):
    """Loopback peers count as local, which libtorrent exempts from its limits unless told:
    300,000 bytes at 64 KiB/s take more than 3 s (they take well under 1 s uncapped)."""
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    seed, leecher = Swarm("127.0.0.1", 0, 2, rate_limit=65536), Swarm("127.0.0.1", 0, 2)
    try:
        seed.seed(metadata, artifact)
        leecher.connect([f"127.0.0.1:{seed.port}"])
        began = time.monotonic()
        leecher.fetch(metadata, str(tmp_path / "node" / "app-1.0.tar.gz"), digest(build), RUN_ID, app="app", timeout=60)
        assert time.monotonic() - began > 3
    finally:
        seed.close()
        leecher.close()


def test_pieces_a_peer_sends_bad_fail_their_check_and_come_from_a_good_peer(artifact, tmp_path, swarms):
    """A seed whose file is overwritten after it served (and so checked) every piece sends
    garbage: the leecher counts the failed pieces and bans the seed (the only peer that sent a
    failed piece, so libtorrent bans it at once), then gets the pieces from a good node."""
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    bad, good, leecher = swarms
    bad.seed(metadata, artifact)
    good.connect([f"127.0.0.1:{bad.port}"])
    good.fetch(metadata, str(tmp_path / "good" / "app-1.0.tar.gz"), digest(build), RUN_ID, app="app", timeout=60)
    with open(artifact, "r+b") as stream:
        stream.write(os.urandom(len(build)))
    leecher.connect([f"127.0.0.1:{bad.port}"])
    target = tmp_path / "node" / "app-1.0.tar.gz"
    failures = []

    def fetch():
        try:
            leecher.fetch(metadata, str(target), digest(build), RUN_ID, app="app", timeout=60)
        except SwarmError as exc:
            failures.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    deadline = time.monotonic() + 30
    while f"127.0.0.1:{bad.port}" not in leecher.banned and time.monotonic() < deadline:
        time.sleep(0.05)
    leecher.connect([f"127.0.0.1:{good.port}"])
    thread.join(90)
    assert not failures
    assert target.read_bytes() == build
    assert leecher.hash_failures >= 1 and f"127.0.0.1:{bad.port}" in leecher.banned


def test_a_swarm_admits_only_the_peers_it_was_given(artifact, tmp_path):
    """The seed on 127.0.0.1 refuses a node on 127.0.0.2 until that node is one of its peers."""
    metadata = create_metadata(artifact)
    with open(artifact, "rb") as stream:
        build = stream.read()
    seed, outsider = Swarm("127.0.0.1", 0, 2), Swarm("127.0.0.2", 0, 2)
    try:
        seed.seed(metadata, artifact)
        outsider.connect([f"127.0.0.1:{seed.port}"])
        target = tmp_path / "outsider" / "app-1.0.tar.gz"
        with pytest.raises(SwarmError, match="did not arrive .* connected to 0 of the 1 peers"):
            outsider.fetch(metadata, str(target), digest(build), RUN_ID, app="app", timeout=3)
        seed.connect([f"127.0.0.2:{outsider.port}"])
        outsider.fetch(metadata, str(target), digest(build), RUN_ID, app="app", timeout=60)
        assert target.read_bytes() == build
    finally:
        seed.close()
        outsider.close()


class Recorder:
    """What ``_Serving`` needs of a worker's driver: the records it writes, none refused."""

    def __init__(self):
        self.schema = Schema()
        self.node = "node-1"
        self.written = []

    def clock(self):
        return 1_700_000_000.0

    def write_state(self, state):
        self.written.append(state)
        return True


def test_a_download_writes_its_progress_at_most_once_a_quarter_and_never_more_often_than_its_period(monkeypatch):
    release = ReleaseRecord(app="web", version="1", run_id=RUN_ID, fanout=2, filters=ReleaseFilters(),
                            target_count=3, leader="node-0", fired_at=1.0, status="running",
                            checksum="sha256:" + "0" * 64,
                            artifact=ReleaseArtifact(name="web-1.tar.gz", length=1000, info_hash="0" * 40))
    now = [100.0]
    monkeypatch.setattr(_swarm_worker.time, "monotonic", lambda: now[0])
    driver = Recorder()
    serving = _swarm_worker._Serving(driver, release, ArtifactConfig(path="/srv/{{ app }}-{{ version }}.tar.gz"),
                                     timeout=60, upload_slots=2)
    for step in range(1001):  # one poll per byte, 10 ms apart: 10 s of download
        now[0] += 0.01
        serving.progress(step, 100)
    assert [state.downloaded for state in driver.written] == [250, 500, 750]
    assert all(state.status == "pulling" and state.rate == 100 and state.fetched is None for state in driver.written)
    driver.written.clear()
    fast = _swarm_worker._Serving(driver, release, ArtifactConfig(path="/srv/{{ app }}-{{ version }}.tar.gz"),
                                  timeout=60, upload_slots=2)
    for step in range(1001):  # the same in 1 s, less than the period: the done record says it all
        now[0] += 0.001
        fast.progress(step, 1000)
    assert driver.written == []


def test_endpoints_are_ordered_by_ip_version_then_address_then_port():
    assert endpoint_order(("127.0.0.2", 1)) < endpoint_order(("127.0.0.10", 1)) < endpoint_order(("127.0.0.10", 2))
    assert endpoint_order(("10.0.0.1", 9)) < endpoint_order(("::1", 1))
