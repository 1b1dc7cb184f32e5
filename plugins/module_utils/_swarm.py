# SPDX-License-Identifier: MIT
"""An app's artifact over the swarm: torrent metadata, its checks, peers, the libtorrent session.

An app may declare one artifact file. The leader publishes the file's torrent metadata (the
bencoded v1 info dict of that one file) with the release; each target downloads the file from
the nodes that already have it, verifies it, and only then runs the app's commands. Consul
takes a tracker's place: the metadata and its info-hash live in KV, and the leader gives each
node its neighbours in the node's plan entry, each at its catalog address and the swarm port
its node advertises. Nothing else finds peers: DHT, local peer discovery, peer exchange, UPnP, NAT-PMP
and trackers are off, the session listens only on the node's own cluster address, and an IP
filter admits only the addresses of the node's neighbours (which are the nodes that list it).

Everything read from KV is checked by the rules of ``_validation`` before libtorrent sees it:
the metadata's size is bounded before it is decoded, it must describe exactly the one file
the release names (its basename, length, piece size and piece count) and hash to the release's
info-hash; a peer is an IP literal and a port (``_validation.check_endpoint``), never a host name.

libtorrent (``libtorrent==2.1.1``, installed by the fireap_node role) is imported only when a
swarm is used, so the rest of the node path runs without it. The checks of metadata and peers
are stdlib only.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_mismatch
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    ARTIFACT_MAX,
    PIECE_MAX,
    PIECE_MIN,
    PIECES_MAX,
    check_artifact_length,
    check_artifact_name,
    check_endpoint,
    check_info_hash,
    check_int,
    check_ip,
    check_name,
    check_run_id,
    endpoint,
    show,
)

#: Largest info dict accepted from KV: the pieces plus room for the name and the numbers (about
#: 86 KB, a sixth of Consul's 512 KB limit on one value, also base64-encoded in a transaction).
METADATA_MAX = PIECES_MAX * 20 + 4096
#: The keys of the info dict of one file (v1): any other key (``files``: several files) is refused.
INFO_KEYS = (b"length", b"name", b"piece length", b"pieces")
#: The folder under the artifact's directory where a node downloads before it verifies.
STAGING_FOLDER = ".fireap-swarm"
#: ``progress(bytes, rate)``: how much of the artifact a download holds, and its bytes per second.
Progress = Callable[[int, int], None]
#: Seconds between two re-connections to the known peers, and the longest single wait for an alert.
POLL_SECONDS = 0.5
#: Seconds the higher endpoint of two neighbours leaves their link to the lower one (see Swarm._reconnect).
YIELD_SECONDS = 2.0


class SwarmError(FireapError):
    """The swarm refused a value (metadata, a peer) or could not deliver the artifact."""


def _libtorrent() -> Any:
    """The libtorrent module, or SwarmError saying how to get it."""
    try:
        import libtorrent  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise SwarmError("an app with an artifact needs the Python package libtorrent (libtorrent==2.1.1, which "
                         f"the fireap_node role installs into its venv), which cannot be imported: {exc}") from None
    return libtorrent


def piece_size(length: int) -> int:
    """The smallest power of two >= PIECE_MIN that cuts ``length`` bytes into at most PIECES_MAX pieces."""
    check_artifact_length(length)
    size = PIECE_MIN
    while math.ceil(length / size) > PIECES_MAX:
        size *= 2
    return size


@dataclass(frozen=True)
class Metadata:
    """One artifact's torrent metadata: the bencoded info dict and what it describes."""

    info: bytes
    info_hash: str
    name: str
    length: int
    piece_length: int

    @property
    def pieces(self) -> int:
        return math.ceil(self.length / self.piece_length)


# --- bencode: only what an info dict of one file holds, bounded, canonical ---


def _bencode(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        return b"i%de" % value
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(_bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        return b"d" + b"".join(_bencode(key) + _bencode(value[key]) for key in sorted(value)) + b"e"
    raise SwarmError(f"cannot bencode {type(value).__name__}")


def _bdecode(data: bytes, index: int, depth: int) -> tuple[Any, int]:
    """The value at ``data[index:]`` and the index after it; SwarmError when malformed."""
    if depth > 4:
        raise SwarmError("metadata nests too deep")
    kind = data[index:index + 1]
    if kind == b"i":
        end = data.find(b"e", index)
        if end < 0 or end - index > 21:
            raise SwarmError("metadata holds a malformed integer")
        try:
            return int(data[index + 1:end]), end + 1
        except ValueError:
            raise SwarmError("metadata holds a malformed integer") from None
    if kind in (b"l", b"d"):
        items = []
        index += 1
        while data[index:index + 1] != b"e":
            if index >= len(data):
                raise SwarmError("metadata ends inside a list or dict")
            item, index = _bdecode(data, index, depth + 1)
            items.append(item)
        if kind == b"l":
            return items, index + 1
        if len(items) % 2 or not all(isinstance(key, bytes) for key in items[::2]):
            raise SwarmError("metadata holds a malformed dict")
        return dict(zip(items[::2], items[1::2])), index + 1
    colon = data.find(b":", index, index + 8)
    if colon < 0 or not data[index:colon].isdigit():
        raise SwarmError("metadata holds a malformed string")
    end = colon + 1 + int(data[index:colon])
    if end > len(data):
        raise SwarmError("metadata ends inside a string")
    return data[colon + 1:end], end


def check_metadata(data: Any, *, name: str, length: int, info_hash: str) -> Metadata:
    """The metadata ``data`` read from KV, if it is the info dict of exactly the artifact the
    release names: one file called ``name`` of ``length`` bytes, a power-of-two piece size
    within PIECE_MIN..PIECE_MAX, one 20-byte hash per piece, hashing to ``info_hash``.

    Anyone who can write KV can write this value: its size is checked before it is decoded,
    it must be canonical bencode (so the hash covers exactly what was checked), and nothing in
    it may name another file or path.
    """
    check_artifact_name(name)
    check_artifact_length(length)
    check_info_hash(info_hash)
    if not isinstance(data, bytes):
        raise SwarmError(f"artifact metadata must be bytes, got {type(data).__name__}")
    if len(data) > METADATA_MAX:
        raise SwarmError(f"artifact metadata has {len(data)} bytes; at most {METADATA_MAX}")
    try:
        info, end = _bdecode(data, 0, 0)
    except SwarmError as exc:
        raise SwarmError(f"artifact metadata is not bencoded: {exc}") from None
    if end != len(data) or not isinstance(info, dict) or _bencode(info) != data:
        raise SwarmError("artifact metadata is not one canonically bencoded dict")
    if b"files" in info:
        raise SwarmError("artifact metadata describes several files; an artifact is one file")
    if sorted(info) != sorted(INFO_KEYS):
        raise SwarmError(f"artifact metadata must hold exactly the keys {', '.join(k.decode() for k in INFO_KEYS)}, "
                         f"got {', '.join(show(k) for k in sorted(info))}")
    try:
        got_name = check_artifact_name(info[b"name"].decode("utf-8") if isinstance(info[b"name"], bytes) else None)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SwarmError(f"artifact metadata names no file of its own directory: {exc}") from None
    if got_name != name:
        raise SwarmError(f"artifact metadata names the file {show(got_name)}, the release {show(name)}")
    if info[b"length"] != length:
        raise SwarmError(f"artifact metadata gives the length {show(info[b'length'])}, the release {length}")
    piece = info[b"piece length"]
    if (not isinstance(piece, int) or not PIECE_MIN <= piece <= PIECE_MAX or piece & (piece - 1)):
        raise SwarmError(f"artifact metadata's piece length {show(piece)} must be a power of two within "
                         f"{PIECE_MIN}..{PIECE_MAX}")
    count = math.ceil(length / piece)
    if count > PIECES_MAX:
        raise SwarmError(f"artifact metadata has {count} pieces; at most {PIECES_MAX}")
    pieces = info[b"pieces"]
    if not isinstance(pieces, bytes) or len(pieces) != 20 * count:
        raise SwarmError(f"artifact metadata must hold {count} piece hashes of 20 bytes")
    actual = hashlib.sha1(data).hexdigest()
    if actual != info_hash:
        raise SwarmError(f"artifact metadata has the info-hash {actual}, the release {info_hash}")
    return Metadata(info=data, info_hash=info_hash, name=name, length=length, piece_length=piece)


def create_metadata(path: str) -> Metadata:
    """The metadata of the file at ``path`` (v1 only, so one info-hash; no trackers, no web
    seeds; piece size from ``piece_size``), checked by the rules a node reads it by."""
    lt = _libtorrent()
    try:
        length = os.stat(path).st_size
    except OSError as err:
        raise SwarmError(f"cannot read the artifact {path}: {err.strerror or err}") from None
    if not 0 < length <= ARTIFACT_MAX:
        raise SwarmError(f"the artifact {path} has {length} bytes; an artifact has 1..{ARTIFACT_MAX} bytes")
    name = check_artifact_name(os.path.basename(path))
    creator = lt.create_torrent([lt.create_file_entry(name, length)], piece_size(length),
                                lt.create_torrent.v1_only)
    try:
        lt.set_piece_hashes(creator, os.path.dirname(path) or ".")
    except RuntimeError as err:
        raise SwarmError(f"cannot hash the artifact {path}: {err}") from None
    info = lt.bencode(creator.generate()[b"info"])
    return check_metadata(info, name=name, length=length, info_hash=hashlib.sha1(info).hexdigest())


# --- the session ---


def staging_dir(final_path: str, app: str, run_id: str) -> str:
    """``<artifact dir>/.fireap-swarm/<app>/<run_id>``: where a node downloads the artifact before
    it is verified, on the final path's file system so that the verified file is renamed into
    place; one folder per app, since apps may share the artifact directory."""
    return os.path.join(os.path.dirname(final_path), STAGING_FOLDER, check_name(app, "app"), check_run_id(run_id))


def _clear_staging(staging: str, keep: bool) -> None:
    """Remove the app's staging folders other than ``staging`` (left by a worker killed
    mid-download: one worker per app runs on a node), ``staging`` too unless ``keep``, and the
    folders above them once empty."""
    app_folder = os.path.dirname(staging)
    try:
        names = os.listdir(app_folder)
    except OSError:  # none yet (or not a folder: creating the staging folder says why)
        names = []
    for name in names:
        path = os.path.join(app_folder, name)
        if path != staging or not keep:
            shutil.rmtree(path, ignore_errors=True)
    for folder in (app_folder, os.path.dirname(app_folder)):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (another app's download, or this one's kept) or gone
            break


def endpoint_order(peer: tuple[str, int]) -> tuple[int, bytes, int]:
    """A total order of checked endpoints, the same on every node."""
    address = ipaddress.ip_address(peer[0])
    return address.version, address.packed, peer[1]


class Swarm:
    """One node's libtorrent session for one artifact: it listens only on the node's cluster
    ``address`` at ``port`` (0: any free port, see ``port``), unchokes at most ``upload_slots``
    peers at once (the app's ``max_semaphores``), sends and receives at most ``rate_limit``
    bytes per second each way (None: no cap), and talks only to the peers given to
    ``connect``, in both directions. Thread-safe: a thread may add peers while another waits for the download."""

    def __init__(self, address: str, port: int, upload_slots: int, rate_limit: int | None = None) -> None:
        lt = _libtorrent()
        self._lt = lt
        self.address = check_ip(address)
        port = check_int(port, "swarm port", 0, 65535)
        categories = lt.alert.category_t
        cap = 0 if rate_limit is None else check_int(rate_limit, "rate limit", 1, 2**31 - 1)  # 0: none
        settings = {
            "listen_interfaces": endpoint(self.address, port),
            # The port the node advertised or none: libtorrent would otherwise try the next
            # ports, then one of the OS's, where no peer looks for it.
            "max_retry_port_bind": 0,
            "listen_system_port_fallback": False,
            "outgoing_interfaces": self.address,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "dht_bootstrap_nodes": "",
            # TCP only: uTP moves every ~1400-byte packet through user space (and backs off as a
            # background protocol), several times the CPU per byte of TCP.
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            # One seed, every other node starting at once: a peer that keeps 1 s of requests
            # queued (not 3) and announces a piece 200 ms before it has it leaves the seed fewer
            # pieces to send twice (about 11 s instead of 13 for 38 MB to 9 peers at 50 Mbit/s).
            "request_queue_time": 1,
            "predictive_piece_announce": 200,
            "unchoke_slots_limit": check_int(upload_slots, "upload slots", 1, 64),
            # The cap holds for every peer (see _apply_peer_classes).
            "upload_rate_limit": cap,
            "download_rate_limit": cap,
            # Nodes of a dev cluster share one address; real nodes have one each.
            "allow_multiple_connections_per_ip": True,
            # One disk thread, not 10: the one file is written and read through the page cache,
            # and every block handed to another of 10 threads is a wake-up. With 30 nodes on one
            # 2-core host, a release's workers took about 20 s of CPU instead of 26.
            "aio_threads": 1,
            "alert_mask": (categories.error_notification | categories.status_notification
                           | categories.storage_notification | categories.peer_notification),
        }
        # flags 0: none of the default extensions, peer exchange among them (peers only from Consul).
        self._session = lt.session(settings, 0)
        self._lock = threading.Lock()
        self._allowed: set[str] = {self.address}
        self._peers: set[tuple[str, int]] = set()
        self._handle: Any = None
        #: When each peer was last seen connected (or admitted): see _reconnect.
        self._seen: dict[tuple[str, int], float] = {}
        self._closing = threading.Event()
        self._connector = threading.Thread(target=self._keep_connecting, name="swarm-connect", daemon=True)
        #: Pieces of a download that failed their hash check (bad data from a peer, fetched
        #: again), and the addresses of the peers banned for sending them.
        self.hash_failures = 0
        self.banned: set[str] = set()
        try:
            self._apply_filter()
            self._apply_peer_classes()
            self._await_listening(endpoint(self.address, port))
            self._connector.start()
        except BaseException:
            self.close()
            raise

    def _await_listening(self, where: str) -> None:
        """Return once the session listens on TCP (bounded), so the port it reports is in use."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for alert in self._session.pop_alerts():
                if isinstance(alert, self._lt.listen_failed_alert):
                    raise SwarmError(f"the swarm cannot listen on {where}: {alert.message()}")
                if (isinstance(alert, self._lt.listen_succeeded_alert)
                        and alert.socket_type == self._lt.socket_type_t.tcp):
                    return
            self._session.wait_for_alert(int(POLL_SECONDS * 1000))
        raise SwarmError(f"the swarm did not start listening on {where} within 10 s")

    @property
    def seeding(self) -> bool:
        """Whether the session serves the verified artifact (a failed fetch leaves nothing to serve)."""
        with self._lock:
            return self._handle is not None

    @property
    def port(self) -> int:
        """The port the session listens on (the one the OS chose for port 0)."""
        return check_int(self._session.listen_port(), "swarm port", 1, 65535)

    def _apply_filter(self) -> None:
        """Block every address but this node's and its peers', in both directions."""
        rules = self._lt.ip_filter()
        rules.add_rule("0.0.0.0", "255.255.255.255", 1)
        rules.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        for address in self._allowed:
            rules.add_rule(address, address, 0)
        self._session.set_ip_filter(rules)

    def _apply_peer_classes(self) -> None:
        """Put every peer in the global peer class, which the rate limits apply to: by default
        libtorrent exempts peers on private and loopback networks, which cluster nodes are."""
        classes = self._lt.ip_filter()
        everyone = 1 << self._lt.session.global_peer_class_id
        classes.add_rule("0.0.0.0", "255.255.255.255", everyone)
        classes.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", everyone)
        self._session.set_peer_class_filter(classes)

    def connect(self, peers: Iterable[str]) -> None:
        """Admit ``peers`` (``ADDRESS:PORT``, checked by ``check_endpoint``) and connect to them,
        now and every POLL_SECONDS while the swarm is open (see ``_reconnect``); the node's own
        endpoint is skipped."""
        with self._lock:
            fresh = {check_endpoint(item) for item in peers} - self._peers
            fresh.discard((self.address, self.port))
            if not fresh:
                return
            self._peers |= fresh
            now = time.monotonic()
            self._seen.update((peer, now) for peer in fresh)
            if not {address for address, _port in fresh} <= self._allowed:
                self._allowed |= {address for address, _port in fresh}
                self._apply_filter()
        self._reconnect()

    def _reconnect(self) -> None:
        """Connect to the admitted peers that are not connected. Of two neighbours the one with
        the lower endpoint connects; the other waits until the link has been down YIELD_SECONDS
        (a peer listed by one side only is still reached): when both connect at once libtorrent
        drops both connections as duplicates, and they would keep doing so."""
        with self._lock:
            peers, handle = set(self._peers), self._handle
        if handle is None:
            return
        try:
            infos = handle.get_peer_info()
        except RuntimeError:  # the torrent went meanwhile (a download ended)
            return
        now = time.monotonic()
        endpoints = {(info.ip[0], info.ip[1]) for info in infos}
        addresses = {address for address, _port in endpoints}
        own = (self.address, self.port)
        lower = endpoint_order(own)
        shared = collections.Counter(address for address, _port in peers | {own})
        for peer in peers:
            # Real nodes have an address each: an incoming connection (from another port) is the
            # peer's. Nodes sharing one address (a dev cluster on loopback) cannot tell theirs.
            if peer in endpoints or (shared[peer[0]] == 1 and peer[0] in addresses):
                self._seen[peer] = now
            elif lower < endpoint_order(peer) or now - self._seen.get(peer, now) >= YIELD_SECONDS:
                try:
                    handle.connect_peer(peer)
                except RuntimeError:
                    return

    def _keep_connecting(self) -> None:
        """Reconnect every POLL_SECONDS until the swarm closes: a peer may not listen yet, or restart."""
        while not self._closing.wait(POLL_SECONDS):
            self._reconnect()

    def _add(self, metadata: Metadata, save_path: str, seed: bool) -> None:
        lt = self._lt
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(lt.bdecode(b"d4:info" + metadata.info + b"e"))
        params.save_path = save_path
        flags = lt.torrent_flags
        params.flags = (flags.disable_dht | flags.disable_lsd | flags.disable_pex | flags.apply_ip_filter
                        | (flags.seed_mode if seed else 0))
        handle = self._session.add_torrent(params)
        with self._lock:
            self._handle = handle
        self._reconnect()

    def seed(self, metadata: Metadata, path: str) -> None:
        """Serve the file at ``path``, which is the artifact (the leader's, or one verified
        here): libtorrent checks each piece when it first sends it."""
        if os.path.basename(path) != metadata.name:
            raise SwarmError(f"the file {path} is not named {metadata.name}")
        self._add(metadata, os.path.dirname(path), seed=True)

    def _read_alerts(self) -> None:
        """Raise the swarm's errors; count the pieces that failed their hash check and the
        peers banned for them."""
        for alert in self._session.pop_alerts():
            if isinstance(alert, (self._lt.torrent_error_alert, self._lt.file_error_alert)):
                raise SwarmError(f"the swarm failed: {alert.message()}")
            if isinstance(alert, self._lt.hash_failed_alert):
                self.hash_failures += 1
            elif isinstance(alert, self._lt.peer_ban_alert):
                self.banned.add(endpoint(*alert.endpoint))

    def fetch(self, metadata: Metadata, final_path: str, checksum: str, run_id: str, timeout: float,
              ended: threading.Event | None = None, progress: Progress | None = None, *, app: str) -> int:
        """Download the artifact into ``final_path`` and go on seeding it from there; the bytes
        that came from the swarm (0 when the file was there already).

        The download goes into ``staging_dir``; the whole file's SHA-256 must be ``checksum``
        before libtorrent moves it onto ``final_path`` (a rename), so bad data never lands there
        (libtorrent checked each piece against the metadata already). The torrent stays in the
        session throughout: the node serves its pieces to its neighbours while it downloads,
        while it verifies and after the move, its connections kept. A file already at
        ``final_path`` that has the checksum is seeded as it is. SwarmError when the download
        does not finish within ``timeout`` seconds, ``ended`` is set meanwhile (the run is over),
        or it fails. The staging folder goes on every path, and with it those of ``app``'s
        earlier runs that a killed worker left (a retry of the same run resumes from its own
        folder). ``progress(bytes, rate)`` is called at every poll.
        """
        if os.path.basename(final_path) != metadata.name:
            raise SwarmError(f"the artifact path {final_path} is not named {metadata.name}")
        staging = staging_dir(final_path, app, run_id)
        if os.path.isfile(final_path) and file_mismatch(final_path, checksum) is None:
            _clear_staging(staging, keep=False)
            self.seed(metadata, final_path)
            return 0
        _clear_staging(staging, keep=True)
        try:
            os.makedirs(staging, mode=0o700, exist_ok=True)
            self._add(metadata, staging, seed=False)
            try:
                self._download(metadata, timeout, ended, progress)
                self._flush()
                mismatch = file_mismatch(os.path.join(staging, metadata.name), checksum)
                if mismatch is not None:
                    raise SwarmError(f"the artifact from the swarm is not the release's: {mismatch}")
                self._move(os.path.dirname(final_path))
            except BaseException:
                self._remove()
                raise
        finally:
            _clear_staging(staging, keep=False)
        return metadata.length

    def _download(self, metadata: Metadata, timeout: float, ended: threading.Event | None,
                  progress: Progress | None) -> None:
        """Wait until the torrent holds every piece."""
        deadline = time.monotonic() + timeout
        while True:
            status = self._handle.status()
            if progress is not None:
                progress(status.total_wanted_done, status.download_payload_rate)
            if status.is_seeding:
                return
            if time.monotonic() >= deadline:
                with self._lock:
                    admitted = len(self._peers)
                # How many peers were connected tells a dead network from a slow one.
                raise SwarmError(f"the artifact did not arrive from the swarm within {timeout:g} s "
                                 f"({status.progress:.0%} of {metadata.length} bytes; connected to "
                                 f"{status.num_peers} of the {admitted} peers it was given)")
            if ended is not None and ended.is_set():
                raise SwarmError("the run ended before the artifact arrived")
            self._read_alerts()
            self._session.wait_for_alert(int(POLL_SECONDS * 1000))

    def _move(self, folder: str) -> None:
        """Have libtorrent move the verified file into ``folder`` (replacing a file of that
        name) and serve it from there."""
        self._handle.move_storage(folder, self._lt.move_flags_t.always_replace_files)
        alert = self._await_alert((self._lt.storage_moved_alert, self._lt.storage_moved_failed_alert),
                                  f"move the verified artifact into {folder}")
        if isinstance(alert, self._lt.storage_moved_failed_alert):
            raise SwarmError(f"the verified artifact could not be moved into {folder}: {alert.message()}")

    def _flush(self) -> None:
        """Wait until libtorrent wrote every block to the file: a piece passes its hash check
        from the blocks in memory, before they are on disk."""
        self._handle.flush_cache()
        self._await_alert((self._lt.cache_flushed_alert,), "write the artifact to disk")

    def _await_alert(self, kinds: tuple, what: str) -> Any:
        """The first alert of ``kinds`` (those before it dropped); SwarmError saying that
        libtorrent did not ``what`` within 10 s."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for alert in self._session.pop_alerts():
                if isinstance(alert, kinds):
                    return alert
            self._session.wait_for_alert(int(POLL_SECONDS * 1000))
        raise SwarmError(f"libtorrent did not {what} within 10 s")

    def _remove(self) -> None:
        """Take the torrent out of the session and wait (bounded) until its file is closed."""
        with self._lock:
            handle, self._handle = self._handle, None
        self._session.remove_torrent(handle)
        self._await_alert((self._lt.torrent_removed_alert,), "release the artifact's file")

    def close(self) -> None:
        """Stop serving and shut the session down, its sockets closed on return: the worker's
        next run listens on the same port. Closing twice does nothing."""
        self._closing.set()
        if self._connector.is_alive():
            self._connector.join()
        with self._lock:
            session, self._session = self._session, None
            handle, self._handle = self._handle, None
        if session is None:
            return
        session.pause()
        if handle is not None:
            session.remove_torrent(handle)
        # libtorrent's session destructor waits until the session's thread has stopped.
        del session
