"""Which intermediate a node homes on, when it knows several (sans-IO).

A node given several intermediates (`--intermediate A --intermediate B`, or one name with
several addresses) asks each for its address with a STUN Binding request (RFC 8489 §3: every
intermediate answers STUN) and homes on the one that answers first, the nearest. The others
are its fallbacks, in the order they answered; the ones that did not answer come last, in the
order given. When the home is lost the node ranks again at once, so a dead intermediate
(silent) sorts last and the node is at the next one within a round trip or two.
"""

from .wire import stun

RANK_TIMEOUT = 0.5  # s a ranking waits for the intermediates' answers


class HomeRanking:
    """One round of STUN probes to the candidate intermediates."""

    def __init__(self, homes):
        self.homes = list(homes)  # [(addr, tls name)], in the order configured
        self.rtts = {}  # addr -> seconds
        self._sent = {}  # transaction id -> (addr, time sent)

    def probes(self, now):
        """The Binding requests to send now: [(datagram, addr)]."""
        out = []
        for addr, _name in self.homes:
            request = stun.binding_request()
            self._sent[request.transaction_id] = (tuple(addr[:2]), now)
            out.append((stun.encode(request), tuple(addr[:2])))
        return out

    def response(self, data, addr, now):
        """True if `data` answers one of this round's probes (and is taken)."""
        if len(data) < 20:
            return False
        sent = self._sent.get(bytes(data[8:20]))
        if sent is None or sent[0] != tuple(addr[:2]):
            return False
        try:
            message = stun.decode(data)
        except stun.StunError:
            return False
        if message.message_class != stun.CLASS_SUCCESS:
            return False
        del self._sent[message.transaction_id]
        self.rtts.setdefault(sent[0], max(0.0, now - sent[1]))
        return True

    @property
    def done(self):
        return len(self.rtts) == len({tuple(addr[:2]) for addr, _ in self.homes})

    def order(self):
        """The homes, nearest first; those that did not answer last, as configured."""
        answered = sorted((h for h in self.homes if tuple(h[0][:2]) in self.rtts),
                          key=lambda h: self.rtts[tuple(h[0][:2])])
        return answered + [h for h in self.homes if tuple(h[0][:2]) not in self.rtts]
