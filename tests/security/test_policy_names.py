"""Names on the wire, with the real roles on loopback: a `Register` with 64 service
names of 250 characters containing `*/../` was accepted. Names on the wire now follow the
command line's grammar, so such a Register is not even decodable: the intermediate answers
BAD_MESSAGE, closes the connection, registers nothing, and everyone else carries on."""

import json

from aio_helpers import run, wait_for
from test_policy_offers import connector, refusal

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.wire import control


def hostile_register(name):
    """The attacker's Register, built without the constructor's checks (an honest node cannot
    build it), so the real node sends these very bytes."""
    message = object.__new__(control.Register)
    services = tuple(f"{i:02d}*/../" + "x" * 243 for i in range(64))
    for field, value in (("role", "connector"), ("name", name), ("services", services)):
        object.__setattr__(message, field, value)
    payload = control.encode_payload(message)
    assert len(json.loads(payload)["services"][0]) == 250 and len(payload) > 16000
    return message


def test_a_register_with_hostile_service_names_is_refused(caplog):
    caplog.set_level("WARNING")

    async def main():
        async with LocalDeployment() as d:
            rogue = connector(d, "rogue", ["echo=tcp:127.0.0.1:9"])
            rogue.register_message = lambda: hostile_register("rogue")
            await rogue.start()
            try:
                await wait_for(lambda: d.intermediate.counters["bad_control_messages"] >= 1, 10)
                await wait_for(lambda: "bad control message" in refusal(rogue), 10)
                assert ("connector", "rogue") not in d.intermediate.nodes
                services = {s for n in d.intermediate.nodes.values() for s in n.services}
                assert services == {"echo", "echo-udp"}
                data = b"unaffected" * 1000
                assert await tcp_round_trip(d.forward_address(d.tcp_forward),
                                            data) == data
            finally:
                await rogue.stop()
    run(main(), timeout=60)
