"""The command line as a user meets it: shortcuts, one-line errors, logs, config files."""

import logging

import pytest

from mahole import cli
from mahole.cli import build_parser, main

CREDS = ["--cert", "x.crt", "--key", "x.key"]


def parse(*argv):
    return build_parser().parse_args(list(argv))


def refused(capsys, *argv):
    """Run main(argv), expect exit 2 and return the one error line (no traceback)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def served(monkeypatch):
    """Stop main() where a role would start serving; keep the config it would run."""
    seen = {}

    def fake_serve(args, role_cls, cfg):
        seen["cfg"] = cfg
        return 0
    monkeypatch.setattr(cli, "_serve", fake_serve)
    return seen


# --- friendlier parsing -------------------------------------------------------------------


def test_a_bare_port_means_the_documented_host():
    args = parse("intermediate", "--listen", "4478", "--status", "9100", *CREDS)
    assert args.listen == ("0.0.0.0", 4478)
    assert args.status == ("127.0.0.1", 9100)
    args = parse("agent", "--intermediate", "relay", "--forward", "tcp:127.0.0.1:0=web",
                 "--status", "9101", "--bind", "5000", *CREDS)
    assert args.status == ("127.0.0.1", 9101) and args.bind == ("0.0.0.0", 5000)


def test_an_intermediate_without_a_port_uses_4478():
    args = parse("agent", "--intermediate", "relay.example.org", "--forward",
                 "tcp:127.0.0.1:0=web", *CREDS)
    assert args.intermediate == ("relay.example.org", 4478)
    assert parse("connector", "--intermediate", "[2001:db8::1]:5000", "--service",
                 "web=tcp:127.0.0.1:80", *CREDS).intermediate == ("2001:db8::1", 5000)
    assert parse("connector", "--intermediate", "203.0.113.7", "--service",
                 "web=tcp:127.0.0.1:80", *CREDS).intermediate == ("203.0.113.7", 4478)


def test_an_ipv6_address_without_brackets_gets_a_hint(capsys):
    line = refused(capsys, "agent", "--intermediate", "2001:db8::1", "--forward",
                   "tcp:127.0.0.1:0=web", *CREDS)
    assert line.startswith("mahole agent: error: argument --intermediate: ")
    assert "write an IPv6 address in brackets, as in [2001:db8::1]:4478" in line
    line = refused(capsys, "intermediate", "--listen", "::1", *CREDS)
    assert "as in [::1]:PORT" in line


def test_a_bad_address_names_what_the_user_wrote(capsys):
    line = refused(capsys, "agent", "--intermediate", "bad_host!", "--forward",
                   "tcp:127.0.0.1:0=web", *CREDS)
    assert "expected HOST:PORT, got 'bad_host!'" in line
    line = refused(capsys, "intermediate", "--status", "99999", *CREDS)
    assert "got '99999'" in line and "out of range" in line


def test_two_services_of_one_name_are_refused(capsys, served):
    line = refused(capsys, "connector", "--intermediate", "relay", "--service",
                   "web=tcp:127.0.0.1:80", "--service", "web=tcp:127.0.0.1:81", *CREDS)
    assert line == ("mahole connector: error: two --service entries are named 'web'; "
                    "give each service one name")
    assert "cfg" not in served


def test_an_intermediate_without_allow_warns_it_refuses_everything(caplog, served):
    with caplog.at_level(logging.WARNING, logger="mahole"):
        assert main(["intermediate", *CREDS]) == 0
    assert "no --allow rule: every session will be refused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mahole"):
        assert main(["intermediate", "--allow", "alice=web", *CREDS]) == 0
    assert "no --allow rule" not in caplog.text
    assert served["cfg"].allow == ("alice=web",)
