"""A fleet of intermediates sharing one directory of nodes (sans-IO part).

Each intermediate keeps the nodes it holds itself in memory, as before (`MemoryRegistry`):
the signaling core reads and writes them synchronously, on the hot path of every control
message. What a fleet adds is a *view of the other intermediates' nodes*, copied from a store
they share (Redis, `mahole.fleet_redis`). `FleetRegistry` is that pair:

- the local part: this intermediate's nodes and sessions. Every change to one of its nodes
  is queued in ``outbox`` (``("put", record)`` or ``("del", handle)``) for the shell to
  publish;
- the remote part: records the shell copies in (`apply_remote`, `replace_remote`), keyed by
  their home intermediate. Their handles are rewritten ``"HOME/HANDLE"`` so they never collide
  with local handles (`mahole.signaling.remote_handle` reads them back);
- where each reachable intermediate takes relay frames (``relay_addrs``), for sessions
  between intermediates.

Lookups by identity and by service see both parts, the local one first: so one identity
stays one node across the fleet, and an agent's request can find a connector homed on another
intermediate. Sessions are not shared: a session lives at its agent's intermediate, and the
connector's intermediate keeps a mirror of it (`mahole.signaling`).

Everything read from the store is hostile until parsed: records are bounded in number and
size, and a malformed one is dropped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from .signaling import MemoryRegistry, NodeRecord

# Remote nodes kept from the store, in all; beyond this new ones are dropped and counted.
MAX_REMOTE_NODES = 100_000
# Bytes of one record in the store (a connector with 64 services of 64 characters is ~5 KB).
MAX_RECORD_BYTES = 16 * 1024


class FleetRegistry(MemoryRegistry):
    """This intermediate's registry plus the view of the fleet's other nodes."""

    def __init__(self, home):
        super().__init__()
        self.home = home
        self.outbox = collections.deque()  # ("put", NodeRecord) / ("del", handle) to publish
        self._remote = {}  # home -> {handle (rewritten): NodeRecord}
        self._encoded = {}  # home -> {handle (rewritten): the record as the store had it}
        # (role, name) -> {handle (rewritten): NodeRecord}: usually one; several only while
        # a node moves between intermediates.
        self._remote_identities = collections.defaultdict(dict)
        self._remote_services = collections.defaultdict(dict)  # service -> {handle: record}
        self.counters = {"remote_malformed": 0, "remote_dropped_full": 0,
                         "remote_updates": 0}
        # home -> (host, port) where it takes relay frames, for the intermediates that can be
        # reached now (the shell keeps it: emptied while the store is unavailable).
        self.relay_addrs = {}
        self.store_rtt = 0.0  # s, smoothed round trip to the store (the shell measures it)
        # Identities held here that the store shows held elsewhere too ({(role, name):
        # None}, bounded by the nodes held here): for SignalingCore.resolve_duplicates.
        self.duplicates = {}

    def relay_address(self, home):
        return self.relay_addrs.get(home)

    def fleet_rtt(self):
        return self.store_rtt

    # Local changes are published ---------------------------------------------------------
    def put_node(self, record):
        super().put_node(record)
        self.outbox.append(("put", record))
        copies = self._remote_identities.get((record.role, record.name))
        if copies and any(r.home not in self.relay_addrs for r in copies.values()):
            # Registered while another copy's intermediate could not be asked (the store
            # was unavailable): that copy may live.
            self.duplicates[(record.role, record.name)] = None

    def remove_node(self, handle):
        record = super().remove_node(handle)
        if record is not None:
            self.outbox.append(("del", handle))
        return record

    # Lookups see the fleet -----------------------------------------------------------------
    def node(self, handle):
        local = super().node(handle)
        if local is not None or not isinstance(handle, str) or "/" not in handle:
            return local
        return self._remote.get(handle.split("/", 1)[0], {}).get(handle)

    def node_by_identity(self, role, name):
        local = super().node_by_identity(role, name)
        if local is not None:
            return local
        held = self._remote_identities.get((role, name))
        # The longest registered copy is the one found.
        return min(held.values(), key=lambda r: r.since) if held else None

    def connectors_for(self, service):
        return super().connectors_for(service) + list(self._remote_services.get(service, {})
                                                      .values())

    def remote_copies(self, role, name):
        """The other intermediates' records of this identity."""
        return list(self._remote_identities.get((role, name), {}).values())

    def remote_homes(self):
        """{home: number of nodes} of the other intermediates seen in the store."""
        return {home: len(records) for home, records in self._remote.items()}

    # The store's view comes in ---------------------------------------------------------------
    def replace_remote(self, home, encoded_records):
        """All nodes of ``home`` as the store holds them now ({handle: encoded record}):
        only what changed is parsed and applied (a full read comes every few seconds)."""
        if home == self.home:
            return
        known = self._encoded.get(home, {})
        fresh = {f"{home}/{handle}": _as_bytes(encoded)
                 for handle, encoded in encoded_records.items()}
        for key in [key for key in known if key not in fresh]:
            self._drop_remote(home, key)
        for key, encoded in fresh.items():
            if known.get(key) != encoded:
                self.apply_remote(home, "put", key.split("/", 1)[1], encoded)

    def apply_remote(self, home, op, handle, encoded=None):
        """One change of another intermediate's node: ``op`` "put" (with the encoded
        record) or "del"."""
        if home == self.home:
            return
        key = f"{home}/{handle}"
        if op == "del":
            self._drop_remote(home, key)
            self.counters["remote_updates"] += 1
            return
        record = parse_record(encoded, home)
        if record is None:
            self.counters["remote_malformed"] += 1
            return
        records = self._remote.get(home, {})
        if key not in records and sum(map(len, self._remote.values())) >= MAX_REMOTE_NODES:
            self.counters["remote_dropped_full"] += 1
            return
        self._drop_remote(home, key)
        record = dataclasses.replace(record, handle=key)
        self._remote.setdefault(home, {})[key] = record
        self._encoded.setdefault(home, {})[key] = _as_bytes(encoded)
        self._remote_identities[(record.role, record.name)][key] = record
        for service in record.services:
            self._remote_services[service][key] = record
        if MemoryRegistry.node_by_identity(self, record.role, record.name) is not None:
            self.duplicates[(record.role, record.name)] = None
        self.counters["remote_updates"] += 1

    def forget_home(self, home):
        """Everything of ``home`` (it stopped, or its heartbeat expired)."""
        for key in list(self._remote.get(home, ())):
            self._drop_remote(home, key)
        self._remote.pop(home, None)
        self._encoded.pop(home, None)

    def _drop_remote(self, home, key):
        records = self._remote.get(home)
        record = records.pop(key, None) if records is not None else None
        if record is None:
            return
        self._encoded[home].pop(key, None)
        if not records:
            del self._remote[home]
            del self._encoded[home]
        identity = (record.role, record.name)
        held = self._remote_identities[identity]
        held.pop(key, None)
        if not held:
            del self._remote_identities[identity]
        for service in record.services:
            holders = self._remote_services.get(service)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._remote_services[service]


def _as_bytes(encoded):
    return encoded.encode() if isinstance(encoded, str) else bytes(encoded)


def encode_record(record):
    """A node record as the store keeps it (JSON text)."""
    return json.dumps(record.to_dict(), separators=(",", ":"))


def parse_record(encoded, home):
    """The `NodeRecord` in ``encoded`` (bytes or text from the store), or None if it is
    malformed, too large or claims another home."""
    if isinstance(encoded, (bytes, bytearray)):
        if len(encoded) > MAX_RECORD_BYTES:
            return None
        try:
            encoded = encoded.decode()
        except UnicodeDecodeError:
            return None
    if not isinstance(encoded, str) or len(encoded) > MAX_RECORD_BYTES:
        return None
    try:
        data = json.loads(encoded)
        record = NodeRecord.from_dict(data)
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    if (record.home != home or record.role not in ("agent", "connector")
            or not isinstance(record.name, str) or not record.name
            or not all(isinstance(s, str) for s in record.services)):
        return None
    return record
