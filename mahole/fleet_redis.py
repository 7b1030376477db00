"""The fleet's shared directory in Redis: the intermediate's shell around `FleetRegistry`.

Why Redis: the fleet needs a small, shared, expiring key-value store with change
notifications, which Redis (or Valkey) gives out of the box and users already run; the
maintained `redis` client's asyncio API talks to it. No cluster protocol of our own.

What each intermediate keeps there (keys under ``mahole:``):

- ``mahole:im:NAME``: its heartbeat, {"name", "addr", "instance"}, refreshed every
  `HEARTBEAT` s and expiring after `TTL` s. Intermediates find each other by these keys (no
  static peer list); a name already live with another instance is refused at start.
- ``mahole:nodes:NAME``: a hash of the nodes it holds (handle → JSON `NodeRecord`). It expires
  with the heartbeat, so what a dead intermediate left behind is gone within `TTL` s.
- channel ``mahole:nodes``: each change as it happens ({"home", "op": "put" | "del" | "bye",
  "handle", "record"}), so the others' views follow within milliseconds, and each heartbeat
  ({"op": "beat", "addr"}): an intermediate not heard for `HOME_SILENT` s is unreachable. An
  intermediate writes its key only once Redis has confirmed its subscriptions, so one the
  others take as reachable hears what they send it (but for a subscription being made again
  after a failure: the cores send a session's opening again). Pub/sub rather than
  streams: a missed message costs nothing lasting, because every `RESYNC` s (and after any
  reconnect) each intermediate reads the hashes again; streams would add trimming and
  consumer bookkeeping for no gain.
- channel ``mahole:to:NAME``: signaling of sessions between intermediates (`FleetSend` of
  the signaling core: {"from", "sender", "to", "message", "session"}). Pub/sub drops what
  arrives while a subscriber is away, so the cores never rely on one message: a session
  opened to a connector elsewhere is confirmed back and sent again until it is
  (`mahole.signaling.MIRROR_ATTEMPTS`), probes and resumes have deadlines, and a lost
  candidate exchange costs at most the direct path (the session works on the relay from its
  start).

Redis unavailable: the intermediate keeps serving the nodes and sessions it holds (the local
registry is the truth for them). It cannot vouch for the other intermediates' nodes any more,
so after `TTL` s without Redis it forgets them; an agent asking for a service held elsewhere
is told no connector offers it. Reconnection backs off up to `MAX_BACKOFF` s; once back, the
intermediate writes its whole hash again and reads everyone else's.
"""

import asyncio
import collections
import json
import logging
import secrets
import time

from .fleet import MAX_RECORD_BYTES, encode_record
from .signaling import SessionRecord
from .status import parse_hostport
from .wire import control

log = logging.getLogger(__name__)

# s between heartbeats (and flushes of a quiet outbox): three fit in HOME_SILENT, so one
# late or lost beat (a busy store, a stalled process) does not make an intermediate silent.
HEARTBEAT = 0.5
# s without a heartbeat message: an intermediate is taken as unreachable (no new sessions
# through it, and a node it held may register elsewhere at once). Its nodes stay known until
# its keys expire.
HOME_SILENT = 1.6
TTL = 3.0  # s: an intermediate silent this long is gone, and its nodes with it
RESYNC = 5.0  # s between full reads of the other intermediates' nodes
MAX_BACKOFF = 5.0  # s between reconnection attempts at most
COMMAND_TIMEOUT = 2.0  # s for one Redis command
CHANNEL = "mahole:nodes"
MAX_MESSAGE_BYTES = MAX_RECORD_BYTES + 1024
MAX_DRAIN = 1000  # fleet messages read in a row before silence is judged again
MAX_OUTGOING = 10_000  # fleet messages waiting for Redis; beyond, dropped and counted
MAX_INTERMEDIATES = 1024  # heartbeat keys read at most (a hostile store cannot flood us)


def heartbeat_key(name):
    return f"mahole:im:{name}"


def nodes_key(name):
    return f"mahole:nodes:{name}"


def inbox(name):
    return f"mahole:to:{name}"


class FleetError(Exception):
    """The fleet cannot be joined as configured (a name already live), for a person."""


def redacted(url):
    """The Redis URL without its password, for logs and status."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class RedisFleet:
    """Keeps `registry` (a `FleetRegistry`) in step with the fleet's Redis."""

    def __init__(self, url, name, addr, registry, on_message=None, on_silent=None,
                 on_duplicates=None):
        self.url = url
        self.name = name
        self.addr = addr  # where the others send relay frames for this one, "HOST:PORT"
        self.registry = registry
        # on_message(home, sender, to, message, session, rtt): a FleetSend of another
        # intermediate's core, for this one's (mahole.signaling.SignalingCore.fleet_message).
        self.on_message = on_message
        self.on_silent = on_silent  # on_silent(home): its heartbeats stopped
        # on_duplicates(): identities held here showed up elsewhere (registry.duplicates)
        self.on_duplicates = on_duplicates
        self.instance = secrets.token_hex(8)
        self.connected = False
        self.last_error = None
        self.counters = {"connects": 0, "errors": 0, "published": 0, "received": 0,
                         "messages_malformed": 0, "resyncs": 0, "homes_expired": 0,
                         "signaling_sent": 0, "signaling_received": 0,
                         "signaling_dropped": 0, "subscriptions_lost": 0}
        self._outgoing = collections.deque()  # (channel, text) of signaling to publish
        self._redis = None
        self._wake = asyncio.Event()  # the outbox has something
        self._subscribed = asyncio.Event()  # Redis confirmed both channels' subscriptions
        self._tasks = []
        self._lost_at = None  # monotonic time Redis went away (None while connected)
        self._homes = set()  # other intermediates seen live
        self._last_beat = {}  # home -> monotonic time of its last heartbeat message
        self._stopping = False

    # Life --------------------------------------------------------------------------------
    async def start(self):
        """Claim this intermediate's name if Redis answers (FleetError if another live
        intermediate has it); if Redis does not answer, keep trying in the background."""
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(self.url, socket_timeout=COMMAND_TIMEOUT,
                                        socket_connect_timeout=COMMAND_TIMEOUT,
                                        health_check_interval=0)
        # Subscribed before the others can see this intermediate (its key, its beats): what
        # they send it from then on reaches it.
        loop = asyncio.get_running_loop()
        listen = loop.create_task(self._listen())
        try:
            await asyncio.wait_for(self._subscribed.wait(), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            pass  # Redis does not answer: the claim says so
        try:
            await self._claim()
        except FleetError:
            self._stopping = True
            listen.cancel()
            await asyncio.wait([listen], timeout=COMMAND_TIMEOUT)
            await self._redis.aclose()
            raise
        except Exception as exc:  # noqa: BLE001 - any Redis or network failure
            self._lost(exc)
        self._tasks = [loop.create_task(self._keep()), listen]

    async def stop(self):
        """Leave the fleet: the others forget this intermediate's nodes at once."""
        self._stopping = True
        # A cancellation can be swallowed inside the client (a read's own timeout firing at
        # the same moment): cancel again until the tasks are done; their loops also end on
        # _stopping at their next turn (at most HEARTBEAT s).
        deadline = time.monotonic() + 2 * HEARTBEAT + COMMAND_TIMEOUT
        while True:
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                break
            if time.monotonic() > deadline:
                log.warning("fleet: %d tasks did not stop", len(pending))
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.25)
        if self._redis is None:
            return
        if self.connected:
            try:
                await self._redis.eval(_RELEASE, 2, heartbeat_key(self.name),
                                       nodes_key(self.name), self.instance)
                await self._publish("bye")
            except Exception as exc:  # noqa: BLE001 - leaving anyway; the TTL cleans up
                log.debug("fleet: leaving: %s", exc)
        await self._redis.aclose()

    def changed(self):
        """The registry's outbox has entries: publish them soon."""
        self._wake.set()

    def send(self, event):
        """Carry a `FleetSend` of the signaling core to its intermediate (soon; dropped and
        counted while Redis is unavailable)."""
        if not self.connected or len(self._outgoing) >= MAX_OUTGOING:
            self.counters["signaling_dropped"] += 1
            return
        text = json.dumps({
            "from": self.name, "to": None if event.to is None else str(event.to),
            "sender": None if event.sender is None else str(event.sender),
            "rtt": event.rtt,
            "message": control.encode_payload(event.message).decode(),
            "session": event.session.to_dict() if event.session is not None else None})
        self._outgoing.append((inbox(event.home), text))
        self._wake.set()

    # Writing -----------------------------------------------------------------------------
    async def _claim(self):
        heartbeat = json.dumps({"name": self.name, "addr": self.addr,
                                "instance": self.instance})
        taken = await self._redis.eval(_CLAIM, 1, heartbeat_key(self.name), heartbeat,
                                       self.instance, int(TTL * 1000))
        if taken:
            raise FleetError(f"another intermediate named {self.name!r} is live in this fleet "
                             f"(its heartbeat is in {redacted(self.url)}); each intermediate "
                             f"needs a certificate of its own name")
        await self._write_all()
        if not self.connected:
            self.connected = True
            self.counters["connects"] += 1
            log.info("fleet: joined through %s as %s", redacted(self.url), self.name)
        self._lost_at = None

    async def _write_all(self):
        """This intermediate's whole hash, replacing what Redis held."""
        self.registry.outbox.clear()  # everything below supersedes it
        records = {str(r.handle): encode_record(r) for r in self.registry.nodes()}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(nodes_key(self.name))
            if records:
                pipe.hset(nodes_key(self.name), mapping=records)
                pipe.pexpire(nodes_key(self.name), int(TTL * 1000))
            await pipe.execute()

    async def _flush(self):
        if self._outgoing:
            messages = list(self._outgoing)
            self._outgoing.clear()
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, text in messages:
                        pipe.publish(channel, text)
                    await pipe.execute()
            except Exception:
                self.counters["signaling_dropped"] += len(messages)
                raise
            self.counters["signaling_sent"] += len(messages)
        outbox = self.registry.outbox
        if not outbox:
            return
        changes = list(outbox)
        outbox.clear()
        async with self._redis.pipeline(transaction=True) as pipe:
            for op, item in changes:
                if op == "put":
                    encoded = encode_record(item)
                    pipe.hset(nodes_key(self.name), str(item.handle), encoded)
                    pipe.publish(CHANNEL, self._message("put", str(item.handle), encoded))
                else:
                    pipe.hdel(nodes_key(self.name), str(item))
                    pipe.publish(CHANNEL, self._message("del", str(item)))
            pipe.pexpire(nodes_key(self.name), int(TTL * 1000))
            await pipe.execute()
        self.counters["published"] += len(changes)

    async def _publish(self, op):
        await self._redis.publish(CHANNEL, self._message(op))

    def _message(self, op, handle=None, record=None):
        return json.dumps({"home": self.name, "op": op, "handle": handle, "record": record})

    async def _keep(self):
        """Heartbeat, publish changes, read the others; reconnect with backoff."""
        backoff = 0.25
        next_heartbeat = next_resync = 0.0
        while not self._stopping:
            try:
                if not self.connected:
                    await self._claim()
                    next_resync = 0.0
                    backoff = 0.25
                now = time.monotonic()
                if now >= next_heartbeat:
                    await self._heartbeat()
                    next_heartbeat = now + HEARTBEAT
                await self._flush()
                if now >= next_resync:
                    await self._resync()
                    self._duplicates_found()
                    next_resync = now + RESYNC
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(),
                                           max(0.0, next_heartbeat - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
            except FleetError as exc:
                # Another instance took the name while Redis was away: keep serving what we
                # hold, say so, and try again (it may be a restart of this one).
                self._lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis or network failure
                self._lost(exc)
                self._forget_stale()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _heartbeat(self):
        started = time.monotonic()
        renewed = await self._redis.eval(_RENEW, 2, heartbeat_key(self.name),
                                         nodes_key(self.name), self.instance,
                                         int(TTL * 1000))
        # The store's round trip, smoothed as RFC 6298 §2 does an RTT (gain 1/8): messages to
        # the other intermediates cross it twice (publish, delivery), about one round trip.
        sample = time.monotonic() - started
        registry = self.registry
        registry.store_rtt = (sample if not registry.store_rtt
                              else registry.store_rtt + (sample - registry.store_rtt) / 8)
        if not renewed:  # expired while we were slow, or taken: claim again
            self.connected = False
            await self._claim()
        await self._redis.publish(CHANNEL, json.dumps({"home": self.name, "op": "beat",
                                                       "addr": self.addr}))

    def _lost(self, exc):
        self.counters["errors"] += 1
        self.last_error = str(exc) or type(exc).__name__
        if self.connected or self._lost_at is None:
            log.warning("fleet: Redis at %s unavailable (%s); serving the nodes held here",
                        redacted(self.url), self.last_error)
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        self.connected = False
        # No new sessions through the others while they cannot be told.
        self.registry.relay_addrs.clear()
        self.counters["signaling_dropped"] += len(self._outgoing)
        self._outgoing.clear()

    def _forget_stale(self):
        """Without Redis the others' nodes cannot be vouched for beyond the TTL."""
        if self._lost_at is not None and time.monotonic() - self._lost_at >= TTL:
            for home in list(self.registry.remote_homes()):
                self.registry.forget_home(home)
            self._homes.clear()

    # Reading -----------------------------------------------------------------------------
    async def _resync(self):
        """Every live intermediate's hash, read again; homes whose heartbeat expired are
        forgotten."""
        homes = set()
        async for key in self._redis.scan_iter(match="mahole:im:*", count=256):
            name = key.decode(errors="replace")[len("mahole:im:"):]
            if name and name != self.name:
                homes.add(name)
            if len(homes) >= MAX_INTERMEDIATES:
                break
        relay_addrs = {}
        for home in homes:
            relay_addr = _relay_addr(await self._redis.get(heartbeat_key(home)))
            if relay_addr is not None:
                relay_addrs[home] = relay_addr
            records = await self._redis.hgetall(nodes_key(home))
            self.registry.replace_remote(home, {k.decode(errors="replace"): v
                                                for k, v in records.items()})
        now = time.monotonic()
        for home, relay_addr in relay_addrs.items():
            heard = self._last_beat.setdefault(home, now)  # a newcomer: heard at its key
            if now - heard <= HOME_SILENT:
                self.registry.relay_addrs[home] = relay_addr
        for home in set(self.registry.relay_addrs) - set(relay_addrs):
            del self.registry.relay_addrs[home]
        for home in set(self.registry.remote_homes()) - homes:
            self.registry.forget_home(home)
            self.counters["homes_expired"] += 1
            log.info("fleet: intermediate %s is gone; forgot its nodes", home)
        self._homes = homes
        self.counters["resyncs"] += 1

    async def _listen(self):
        """Changes as the others publish them; resubscribes after a failure."""
        while not self._stopping:
            pubsub = None
            try:
                pubsub = self._redis.pubsub()
                mine = inbox(self.name)
                await pubsub.subscribe(CHANNEL, mine)
                confirmed = 0
                while confirmed < 2:  # both channels: only then is it listening
                    message = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
                    if message is None:
                        raise TimeoutError("Redis did not confirm the subscription")
                    if message.get("type") == "subscribe":
                        confirmed += 1
                    else:
                        self._dispatch(message, mine)
                self._subscribed.set()
                while not self._stopping:
                    message = await pubsub.get_message(timeout=HOME_SILENT / 4)
                    # Silence is judged only once what has arrived is read: after a stall
                    # of this process (the wait above may have timed out during it), the
                    # beats waiting in the socket are news, not silence. Bounded, so a flood
                    # cannot put the judgement off for ever.
                    if message is None:
                        message = await pubsub.get_message(timeout=0)
                    for _ in range(MAX_DRAIN):
                        if message is None:
                            break
                        self._dispatch(message, mine)
                        message = await pubsub.get_message(timeout=0)
                    self._expire_silent()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis or network failure
                # What is published until it is back is lost to this intermediate (the
                # others still take it as reachable: their sessions to it are sent again).
                self.counters["subscriptions_lost"] += 1
                log.info("fleet: subscription lost: %s", exc)
                await asyncio.sleep(min(MAX_BACKOFF, HEARTBEAT))
            finally:
                if pubsub is not None:
                    try:
                        await asyncio.wait_for(pubsub.aclose(), COMMAND_TIMEOUT)
                    except Exception:  # noqa: BLE001 - the connection is gone already
                        pass

    def _dispatch(self, message, mine):
        if message.get("type") != "message":
            return
        if message.get("channel") in (mine, mine.encode()):
            self._signaling(message.get("data"))
        else:
            self._received(message.get("data"))
            self._duplicates_found()

    def _received(self, data):
        self.counters["received"] += 1
        try:
            if not isinstance(data, (bytes, str)) or len(data) > MAX_MESSAGE_BYTES:
                raise ValueError("not a message")
            message = json.loads(data)
            home, op = message["home"], message["op"]
            if not isinstance(home, str) or op not in ("put", "del", "bye", "beat"):
                raise ValueError("bad fields")
        except (ValueError, TypeError, KeyError):
            self.counters["messages_malformed"] += 1
            return
        if home == self.name:
            return
        if op == "beat":
            relay_addr = _relay_addr(data)
            if relay_addr is None:
                self.counters["messages_malformed"] += 1
                return
            self._last_beat[home] = time.monotonic()
            self._homes.add(home)
            if self.connected:
                self.registry.relay_addrs[home] = relay_addr
            return
        if op == "bye":
            self._last_beat.pop(home, None)
            self.registry.forget_home(home)
            self.registry.relay_addrs.pop(home, None)
            self._homes.discard(home)
            log.info("fleet: intermediate %s left", home)
            return
        handle = message.get("handle")
        if not isinstance(handle, str):
            self.counters["messages_malformed"] += 1
            return
        self._homes.add(home)
        self.registry.apply_remote(home, op, handle, message.get("record"))

    def _duplicates_found(self):
        if self.registry.duplicates and self.on_duplicates is not None:
            self.on_duplicates()

    def _expire_silent(self):
        """Intermediates whose heartbeats stopped are unreachable: no sessions through them,
        and the nodes they held may register elsewhere at once."""
        now = time.monotonic()
        for home in list(self.registry.relay_addrs):
            if now - self._last_beat.get(home, now) > HOME_SILENT:
                del self.registry.relay_addrs[home]
                log.info("fleet: intermediate %s is silent", home)
                if self.on_silent is not None:
                    self.on_silent(home)

    def _signaling(self, data):
        """Another intermediate's FleetSend for this one: parsed and checked like network
        input before the core sees it."""
        self.counters["signaling_received"] += 1
        try:
            if not isinstance(data, (bytes, str)) or len(data) > MAX_MESSAGE_BYTES:
                raise ValueError("not a message")
            envelope = json.loads(data)
            home = envelope["from"]
            sender, to = envelope.get("sender"), envelope.get("to")
            if not isinstance(home, str) or not all(isinstance(v, (str, type(None)))
                                                    for v in (sender, to)):
                raise ValueError("bad fields")
            message = control.decode_payload(str(envelope["message"]).encode())
            session = envelope.get("session")
            session = SessionRecord.from_dict(session) if session is not None else None
            rtt = envelope.get("rtt")
            if rtt is not None and (isinstance(rtt, bool) or not isinstance(rtt, (int, float))):
                raise ValueError("bad rtt")
        except (ValueError, TypeError, KeyError, AttributeError, control.ControlError):
            self.counters["messages_malformed"] += 1
            return
        if home != self.name and self.on_message is not None:
            self.on_message(home, sender, to, message, session, rtt)

    def status(self):
        return {"registry": redacted(self.url), "connected": self.connected,
                "last_error": self.last_error, "intermediates": sorted(self._homes),
                "reachable": sorted(self.registry.relay_addrs),
                "remote_nodes": self.registry.remote_homes(),
                "counters": {**self.counters, **self.registry.counters}}


def _relay_addr(heartbeat):
    """(host, port) an intermediate's heartbeat names, or None if it names none."""
    try:
        return parse_hostport(json.loads(heartbeat)["addr"], allow_zero=False)
    except (ValueError, TypeError, KeyError):
        return None


# Lua, so each step is one atomic command (Redis runs a script without interleaving).
# KEYS[1] heartbeat; ARGV: value, instance, ttl ms. Returns 1 if another instance holds it.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held and not string.find(held, '"instance": "' .. ARGV[2] .. '"', 1, true) then
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 0
"""
# KEYS heartbeat, nodes; ARGV instance, ttl ms. Returns 0 if the heartbeat is not ours.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if not held or not string.find(held, '"instance": "' .. ARGV[1] .. '"', 1, true) then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
# KEYS heartbeat, nodes; ARGV instance: delete both if the heartbeat is ours.
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and string.find(held, '"instance": "' .. ARGV[1] .. '"', 1, true) then
  redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
"""
