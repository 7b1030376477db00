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


# --- logs ---------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quic = logging.getLogger("quic").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("quic").setLevel(quic)


@pytest.mark.parametrize("argv, level", [
    ([], logging.WARNING),
    (["-v"], logging.INFO),
    (["-vv"], logging.DEBUG),
    (["-vvv"], logging.DEBUG),
    (["-q"], logging.ERROR),
    (["-qqq"], logging.CRITICAL),
    (["-v", "@", "-v"], logging.DEBUG),       # before and after the role add up
    (["@", "-v", "-q", "-q"], logging.ERROR),
    (["-q", "@", "--verbose"], logging.WARNING),
])
def test_v_and_q_count_from_warning_before_or_after_the_role(argv, level, served,
                                                             restore_logging):
    if "@" not in argv:
        argv = [*argv, "@"]
    at = argv.index("@")
    argv = [*argv[:at], "intermediate", "--allow", "a=b", *CREDS, *argv[at + 1:]]
    assert main(argv) == 0
    assert logging.getLogger().level == level
    # aioquic's own logger opens below WARNING only with -vv.
    assert logging.getLogger("quic").getEffectiveLevel() == (
        max(level, logging.WARNING) if level > logging.DEBUG else logging.DEBUG)


def _one_line(fmt, environ, stream, exc=False):
    from mahole import logs

    handler = logs.setup(verbose=1, fmt=fmt, stream=stream, environ=environ)
    try:
        log = logging.getLogger("mahole.test")
        if exc:
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception("it failed: %s", "why")
        else:
            log.info("hello %s", "world")
        handler.flush()
    finally:
        logging.getLogger().removeHandler(handler)


def test_json_logs_are_one_object_a_line(restore_logging):
    import io
    import json

    out = io.StringIO()
    _one_line("json", {}, out)
    _one_line("json", {}, out, exc=True)
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == (
        "INFO", "mahole.test", "hello world")
    assert first["time"].endswith("Z") and first["time"][:2] == "20"
    assert second["level"] == "ERROR" and second["message"] == "it failed: why"
    assert "RuntimeError: boom" in second["exception"] and "Traceback" in second["exception"]


def test_log_format_json_from_the_command_line(served, restore_logging, capsys):
    import json

    assert main(["intermediate", *CREDS, "--log-format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any("every session will be refused" in line["message"] for line in lines)
    assert all(line["level"] == "WARNING" and line["logger"] == "mahole" for line in lines)


def test_under_systemd_text_logs_have_no_timestamp_of_our_own(tmp_path, restore_logging):
    import os

    with open(tmp_path / "journal", "w") as stream:
        st = os.fstat(stream.fileno())
        _one_line("text", {}, stream)
        _one_line("text", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        # Inherited by a child whose stderr goes elsewhere: not the journal.
        _one_line("text", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
    plain, journal, elsewhere = (tmp_path / "journal").read_text().splitlines()
    assert plain[:2] == "20" and plain.endswith(" mahole.test INFO hello world")
    assert journal == "<6>mahole.test INFO hello world"
    assert elsewhere[:2] == "20"
