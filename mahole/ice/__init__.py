"""Hole punching (RFC 8445 ICE, regular nomination), sans-IO.

- :mod:`.candidates`: candidate priorities, foundations, gathering, pair priorities (§5, §6.1.2.3)
- :mod:`.checklist`: the check list: pairs, pacing, retransmission, triggered checks,
  peer-reflexive candidates, role conflicts, nomination (§6-§8)
- :mod:`.coordinator`: one session's hole punch, from credentials to a direct/relay result
- :mod:`.prediction`: port prediction for NATs that allocate ports in sequence

Nothing here opens sockets or reads the clock; timers go through the node's shared
``mahole._fast.Scheduler``.
"""

from .candidates import (
    TYPE_PREFERENCE,
    Candidate,
    candidate_priority,
    foundation,
    gather,
    host_addresses,
    pair_priority,
)
from .checklist import (
    CheckList,
    ChecksFailed,
    Pair,
    PairNominated,
    PairState,
    PairSucceeded,
    TransitionError,
)
from .coordinator import HolePunch, HolePunchResult, HolePunchState
from .prediction import MappingProbe, predicted_candidates

__all__ = [
    "TYPE_PREFERENCE",
    "Candidate",
    "CheckList",
    "ChecksFailed",
    "HolePunch",
    "HolePunchResult",
    "HolePunchState",
    "MappingProbe",
    "Pair",
    "PairNominated",
    "PairState",
    "PairSucceeded",
    "TransitionError",
    "candidate_priority",
    "foundation",
    "gather",
    "host_addresses",
    "pair_priority",
    "predicted_candidates",
]
