"""`mahole netcheck` on loopback against an in-process intermediate with a second observer:
the table, --json, a silent intermediate (one line, exit 1, within the timeout) and bad
arguments (one line, exit 2)."""

import contextlib
import json
import socket
import time

import pytest
from aio_helpers import run
from ports import free_port

from mahole import binding_lifetime, netcheck_cli
from mahole.cli import main
from mahole.config import IntermediateConfig
from mahole.demo import issue_certificates
from mahole.roles.intermediate import Intermediate


@pytest.fixture
def certs(tmp_path):
    issue_certificates(tmp_path)
    return tmp_path


@contextlib.asynccontextmanager
async def LoneIntermediate(cert_dir, **cfg):
    """An in-process intermediate on loopback, no nodes, with IntermediateConfig overrides."""
    inter = Intermediate(IntermediateConfig(
        listen=("127.0.0.1", 0), allow=("*=*",), ca=str(cert_dir / "ca.crt"),
        cert=str(cert_dir / "intermediate.crt"), key=str(cert_dir / "intermediate.key"),
        control_socket="", **cfg))
    await inter.start()
    try:
        yield inter
    finally:
        await inter.stop()


def test_report_against_an_intermediate_with_an_alternate_observer(certs):
    alt_port = free_port(socket.SOCK_DGRAM)

    async def go():
        async with LoneIntermediate(certs, stun_alt_port=alt_port,
                                    stun_alt_ip="127.0.0.2") as inter:
            lines = []
            report = await netcheck_cli.check([inter.endpoint.local_address[:2]],
                                              progress=lines.append)
            assert inter.counters["stun_changed"] == 2  # both filtering tests answered
            return report, lines

    report, lines = run(go(), timeout=30)
    # Loopback is no NAT: every test answered, the mapped address is a local one.
    assert report.udp and report.nat is False and report.alternate_observer
    assert (report.mapping, report.filtering, report.port_allocation) == (
        "endpoint-independent", "endpoint-independent", "preserving")
    assert report.public_ipv4 == "127.0.0.1" and report.intermediates[0]["rtt_ms"] > 0
    assert any("127.0.0.2:" in line for line in lines)  # progress names the other observer
    table = netcheck_cli.format_report(report)
    assert "\t* UDP: true\n" in table and "\t* Mapping: endpoint-independent\n" in table
    assert json.loads(json.dumps(report.as_dict()))["filtering"] == "endpoint-independent"


def test_without_an_alternate_observer_the_table_says_so(certs):
    async def go():
        async with LoneIntermediate(certs) as inter:
            return await netcheck_cli.check([inter.endpoint.local_address[:2]])

    report = run(go(), timeout=30)
    assert report.udp and not report.alternate_observer and report.filtering is None
    assert "no (the intermediate has no --stun-alt-port)" in netcheck_cli.format_report(report)


def test_a_silent_intermediate_is_one_line_and_exit_1_within_the_timeout(capsys):
    port = free_port(socket.SOCK_DGRAM)
    started = time.monotonic()
    assert main(["netcheck", "--intermediate", f"127.0.0.1:{port}", "--timeout", "0.5",
                 "--json"]) == 1
    assert time.monotonic() - started < 3
    out, err = capsys.readouterr()
    assert json.loads(out)["udp"] is False
    assert err.splitlines()[-1] == (f"mahole netcheck: error: no answer from 127.0.0.1:{port} "
                                    "within 0.5 s (UDP blocked on the way, or the "
                                    "intermediate is down)")


def test_a_name_that_does_not_resolve_is_one_line_and_exit_2(capsys, monkeypatch):
    async def fail(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr("asyncio.base_events.BaseEventLoop.getaddrinfo", fail)
    assert main(["netcheck", "--intermediate", "relay.example", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mahole netcheck: error: cannot resolve the intermediate 'relay.example': "
                   "Name or service not known")


@pytest.mark.parametrize("argv", [["netcheck"], ["netcheck", "--intermediate", "x",
                                                 "--timeout", "60"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_quick_measures_the_binding_lifetime_through_held_answers(certs, monkeypatch):
    # Loopback expires nothing: every delay is answered, late, by the intermediate.
    monkeypatch.setattr(binding_lifetime, "QUICK_DELAYS", (0.3, 0.6, 1.0))

    async def go():
        async with LoneIntermediate(certs) as inter:
            lines = []
            started = time.monotonic()
            report = await netcheck_cli.check([inter.endpoint.local_address[:2]],
                                              progress=lines.append, lifetime="quick")
            assert inter.counters["stun_delayed"] == 3
            return report, lines, time.monotonic() - started

    report, lines, took = run(go(), timeout=30)
    assert report.binding_lifetime == {"at_least_s": 1.0, "below_s": None, "supported": True,
                                       "longest_probed_s": 1.0}
    assert took >= 1.0 + binding_lifetime.WARM_UP
    assert any("binding lifetime" in line for line in lines)
    table = netcheck_cli.format_report(report)
    assert "\t* Binding lifetime: over 1 s (nothing probed expired)\n" in table
    assert json.loads(json.dumps(report.as_dict()))["binding_lifetime"]["at_least_s"] == 1.0


@pytest.mark.parametrize("value, text", [
    (None, "not measured (--lifetime, --quick)"),
    ({"at_least_s": 8.0, "below_s": 10.0, "supported": True, "longest_probed_s": 25},
     "8 s to 10 s"),
    ({"at_least_s": None, "below_s": 2.0, "supported": True, "longest_probed_s": 25},
     "under 2 s"),
    ({"at_least_s": None, "below_s": None, "supported": False, "longest_probed_s": 25},
     "unknown (the intermediate does not hold answers: an older mahole?)")])
def test_the_table_says_what_the_binding_lifetime_measurement_proved(value, text):
    from mahole.netcheck import Report
    report = Report(udp=True, binding_lifetime=value)
    assert f"\t* Binding lifetime: {text}\n" in netcheck_cli.format_report(report)
