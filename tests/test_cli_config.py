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
def served(monkeypatch, restore_logging):
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
    assert args.status == ("127.0.0.1", 9101) and args.bind == ("::", 5000)


def test_several_intermediates_are_one_home_and_its_fallbacks(served):
    assert cli.main(["agent", "--intermediate", "relay1", "--intermediate", "relay2:5000",
                     "--forward", "tcp:127.0.0.1:0=web", *CREDS]) == 0
    cfg = served["cfg"]
    assert cfg.intermediate == ("relay1", 4478) and cfg.fallbacks == (("relay2", 5000),)
    assert cfg.intermediate_name == "relay1"


def test_an_intermediate_without_a_port_uses_4478():
    args = parse("agent", "--intermediate", "relay.example.org", "--forward",
                 "tcp:127.0.0.1:0=web", *CREDS)
    assert args.intermediate == [("relay.example.org", 4478)]
    assert parse("connector", "--intermediate", "[2001:db8::1]:5000", "--service",
                 "web=tcp:127.0.0.1:80", *CREDS).intermediate == [("2001:db8::1", 5000)]
    assert parse("connector", "--intermediate", "203.0.113.7", "--service",
                 "web=tcp:127.0.0.1:80", *CREDS).intermediate == [("203.0.113.7", 4478)]


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


# --- config file and environment ----------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return str(path)


AGENT_TOML = """
intermediate = "relay.example.org"
forward = ["tcp:127.0.0.1:8080=web", "udp:[::1]:5353=dns"]
session-idle-timeout = 60
relay-only = true
cert = "certs/alice.crt"
key = "certs/alice.key"
status = "9101"
"""


def test_a_config_file_holds_what_the_flags_hold(tmp_path, served):
    config = write(tmp_path / "agent.toml", AGENT_TOML)
    assert main(["agent", "--config", config]) == 0
    cfg = served["cfg"]
    assert cfg.intermediate == ("relay.example.org", 4478)
    assert [f.text() for f in cfg.forwards] == ["tcp:127.0.0.1:8080=web", "udp:[::1]:5353=dns"]
    assert cfg.session_idle_timeout == 60.0 and cfg.relay_only and not cfg.direct_only
    assert (cfg.cert, cfg.key, cfg.ca) == ("certs/alice.crt", "certs/alice.key", "certs/ca.crt")
    assert cfg.status == ("127.0.0.1", 9101)
    assert cfg.punch_deadline == 5.0  # not in the file: the default


@pytest.mark.parametrize("file, env, flag, expected", [
    ("file:1", None, None, ("file", 1)),
    ("file:1", "env:2", None, ("env", 2)),
    ("file:1", "env:2", "flag:3", ("flag", 3)),
    (None, "env:2", "flag:3", ("flag", 3)),
    (None, None, None, None),
])
def test_flags_beat_the_environment_which_beats_the_file(tmp_path, monkeypatch, capsys,
                                                         served, file, env, flag, expected):
    config = write(tmp_path / "c.toml", f'intermediate = "{file}"\n' if file else "")
    if env:
        monkeypatch.setenv("MAHOLE_INTERMEDIATE", env)
    argv = ["connector", "--config", config, "--service", "web=tcp:127.0.0.1:80", *CREDS]
    if flag:
        argv += ["--intermediate", flag]
    if expected is None:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            "mahole connector: error: missing --intermediate (give each as a flag, as a "
            "MAHOLE_* environment variable or in --config FILE)")
    else:
        assert main(argv) == 0
        assert served["cfg"].intermediate == expected


def test_environment_variables_name_the_flags(monkeypatch, served):
    monkeypatch.setenv("MAHOLE_FORWARD", "tcp:127.0.0.1:8080=web, udp:127.0.0.1:5353=dns")
    monkeypatch.setenv("MAHOLE_INTERMEDIATE", "relay:5000")
    monkeypatch.setenv("MAHOLE_DIRECT_ONLY", "yes")
    monkeypatch.setenv("MAHOLE_SESSION_IDLE_TIMEOUT", "30")
    monkeypatch.setenv("MAHOLE_CERT", "a.crt")
    monkeypatch.setenv("MAHOLE_KEY", "a.key")
    assert main(["agent"]) == 0
    cfg = served["cfg"]
    assert [f.service for f in cfg.forwards] == ["web", "dns"]
    assert cfg.intermediate == ("relay", 5000) and cfg.direct_only
    assert cfg.session_idle_timeout == 30.0 and (cfg.cert, cfg.key) == ("a.crt", "a.key")


def test_mahole_config_names_the_file(tmp_path, monkeypatch, served):
    monkeypatch.setenv("MAHOLE_CONFIG", write(tmp_path / "agent.toml", AGENT_TOML))
    assert main(["agent"]) == 0
    assert served["cfg"].intermediate == ("relay.example.org", 4478)


@pytest.mark.parametrize("text, env, message", [
    ('frward = ["tcp:127.0.0.1:1=web"]\n', {},
     "{path}: unknown key 'frward' (did you mean 'forward'?)"),
    ('allow = ["alice=web"]\n', {},
     "{path}: unknown key 'allow': it is a setting of the intermediate, not of the agent"),
    ('[agent]\nforward = []\n', {}, "{path}: unknown key 'agent'"),
    ('forward = ["tcp:127.0.0.1=web"]\n', {},
     "{path}: forward: expected tcp:LHOST:LPORT=SERVICE, got 'tcp:127.0.0.1=web'"),
    ('session-idle-timeout = -1\n', {},
     "{path}: session-idle-timeout: expected a positive number of seconds, got '-1'"),
    ('relay-only = "maybe"\n', {}, "{path}: relay-only: expected true or false, got 'maybe'"),
    ('intermediate = 4478\n', {},
     "{path}: intermediate: expected HOST:PORT, got '4478'"),
    ('intermediate = "relay"\nforward = [', {}, "{path}: not valid TOML: "),
    ('', {"MAHOLE_PUNCH_DEADLINE": "soon"},
     "MAHOLE_PUNCH_DEADLINE: expected a number, got 'soon'"),
    ('', {"MAHOLE_RELAY_ONLY": "maybe"}, "MAHOLE_RELAY_ONLY: expected true or false"),
    ('relay-only = true\n', {"MAHOLE_DIRECT_ONLY": "1"},
     "relay-only and direct-only exclude each other (from file and MAHOLE_DIRECT_ONLY)"),
])
def test_bad_settings_are_one_line_naming_the_key(tmp_path, monkeypatch, capsys, served,
                                                  text, env, message):
    path = write(tmp_path / "agent.toml", text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = refused(capsys, "agent", "--config", path, "--intermediate", "relay",
                   "--forward", "tcp:127.0.0.1:0=web", *CREDS) if "intermediate =" not in text \
        and "forward =" not in text else refused(capsys, "agent", "--config", path, *CREDS)
    assert line.startswith("mahole agent: error: " + message.format(path=path)), line
    assert "cfg" not in served


def test_a_missing_config_file_is_one_line(capsys, tmp_path):
    line = refused(capsys, "intermediate", "--config", str(tmp_path / "nope.toml"))
    assert line == f"mahole intermediate: error: config file not found: {tmp_path / 'nope.toml'}"


def _print_config(*argv, env=None):
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAHOLE_")
               or k in ("MAHOLE_NO_EXTENSIONS",)}
    environ.update(env or {})
    run = subprocess.run([sys.executable, "-m", "mahole", *argv, "--print-config"],
                         capture_output=True, text=True, timeout=60, env=environ,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    return run.stdout


def test_print_config_shows_the_effective_settings_as_toml(tmp_path):
    import tomllib

    config = write(tmp_path / "agent.toml", AGENT_TOML)
    text = _print_config("agent", "--config", config, "--punch-deadline", "2", "-v",
                         env={"MAHOLE_BIND": "[::]:7000"})
    settings = tomllib.loads(text)
    assert settings["intermediate"] == ["relay.example.org:4478"]
    assert settings["forward"] == ["tcp:127.0.0.1:8080=web", "udp:[::1]:5353=dns"]
    assert settings["punch-deadline"] == 2.0 and settings["session-idle-timeout"] == 60.0
    assert settings["bind"] == "[::]:7000" and settings["status"] == "127.0.0.1:9101"
    assert settings["verbose"] == 1 and settings["log-format"] == "text"
    assert "punch-deadline = 2.0  # flag" in text and '"[::]:7000"  # MAHOLE_BIND' in text
    assert "session-idle-timeout = 60.0  # file" in text
    assert "# intermediate-name = (not set)" in text
    # The output is a config file that gives the same settings back.
    again = _print_config("agent", "--config", write(tmp_path / "again.toml", text))
    assert tomllib.loads(again) == settings


def test_print_config_of_an_intermediate_shows_its_defaults():
    import tomllib

    settings = tomllib.loads(_print_config("intermediate", "--listen", "5000"))
    assert settings["listen"] == "0.0.0.0:5000" and settings["allow"] == []
    assert settings["max-half-open"] == 256 and settings["ca"] == "certs/ca.crt"
    assert "cert" not in settings  # required, not set: shown as a comment


def test_the_log_settings_come_from_the_file_too(tmp_path, served):
    from mahole import logs

    config = write(tmp_path / "i.toml", 'log-format = "json"\nverbose = 2\n'
                   'allow = ["*=*"]\ncert = "x"\nkey = "y"\n')
    assert main(["intermediate", "--config", config]) == 0
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers)
    # -v and -q are one level: a flag for either beats the file's
    assert main(["intermediate", "--config", config, "-q"]) == 0
    assert root.level == logging.ERROR


def test_docs_configuration_lists_every_key_with_its_roles_and_variable():
    import argparse
    import re
    from pathlib import Path

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    roles = {}
    for role in cli.CONFIGURABLE:
        for setting in sub.choices[role].get_default("settings"):
            roles.setdefault((setting.key, setting.env), []).append(role)
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    documented = {}
    for key, env, where in re.findall(r"^\| `([a-z-]+)` \| `(MAHOLE_[A-Z_]+)` \| ([a-z, ]+) \|",
                                      doc, re.M):
        documented[(key, env)] = list(cli.CONFIGURABLE) if where == "all" else where.split(", ")
    assert documented == roles


# --- certs/ -------------------------------------------------------------------------------


def test_certs_init_writes_to_certs_by_default(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.chdir(tmp_path)
    assert main(["certs", "init"]) == 0
    assert main(["certs", "issue", "--role", "agent", "--name", "alice"]) == 0
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "alice.crt", "alice.key", "ca.crt", "ca.key"]
    assert "wrote CA certificate certs/ca.crt" in capsys.readouterr().out
    # ... which is where the roles look for the CA.
    ca = next(s for s in build_parser().parse_args(["agent"]).settings if s.key == "ca")
    assert ca.default == "certs/ca.crt"


def test_the_certs_folder_keeps_keys_out_of_version_control():
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    assert (root / "certs" / "README.md").is_file()

    def ignored(path):
        return subprocess.run(["git", "-C", str(root), "check-ignore", "-q", path],
                              timeout=30).returncode == 0
    for key in ("certs/ca.key", "certs/alice.key", "certs/relay1.key"):
        assert ignored(key), key
    for public in ("certs/ca.crt", "certs/alice.crt", "certs/README.md", "certs/.gitignore"):
        assert not ignored(public), public


def test_with_json_logs_every_stderr_line_is_json(restore_logging, capsys):
    import json

    assert main(["intermediate", *CREDS, "--log-format", "json", "--max-half-open", "0"]) == 2
    [line] = [json.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert line["level"] == "ERROR"
    assert line["message"] == "mahole intermediate: error: --max-half-open must be > 0"
    assert main(["intermediate", *CREDS, "--max-half-open", "0"]) == 2  # text: as before
    assert capsys.readouterr().err == (
        "mahole intermediate: error: --max-half-open must be > 0\n")


# --- congestion control of end-to-end sessions --------------------------------------------

NODE_ARGS = {"agent": ["--intermediate", "relay", "--forward", "tcp:127.0.0.1:0=web"],
             "connector": ["--intermediate", "relay", "--service", "web=tcp:127.0.0.1:80"]}


@pytest.mark.parametrize("role", ["agent", "connector"])
def test_congestion_control_is_chosen_by_flag_environment_or_file(role, tmp_path, monkeypatch,
                                                                   served):
    from mahole.config import NodeConfig

    assert main([role, *NODE_ARGS[role], *CREDS]) == 0
    assert served["cfg"].congestion_control == NodeConfig.congestion_control
    for value in ("reno", "cubic"):
        assert main([role, *NODE_ARGS[role], "--congestion-control", value, *CREDS]) == 0
        assert served["cfg"].congestion_control == value
    config = write(tmp_path / "node.toml", 'congestion-control = "cubic"\n')
    assert main([role, *NODE_ARGS[role], "--config", config, *CREDS]) == 0
    assert served["cfg"].congestion_control == "cubic"
    monkeypatch.setenv("MAHOLE_CONGESTION_CONTROL", "reno")  # the environment beats the file
    assert main([role, *NODE_ARGS[role], "--config", config, *CREDS]) == 0
    assert served["cfg"].congestion_control == "reno"


def test_an_unknown_congestion_control_is_one_line(tmp_path, capsys, served):
    from mahole.config import AgentConfig

    line = refused(capsys, "agent", *NODE_ARGS["agent"], "--congestion-control", "bbr", *CREDS)
    assert line.startswith("mahole agent: error: argument --congestion-control: invalid "
                           "choice: 'bbr'") and "'reno', 'cubic'" in line
    config = write(tmp_path / "node.toml", 'congestion-control = "vegas"\n')
    line = refused(capsys, "connector", *NODE_ARGS["connector"], "--config", config, *CREDS)
    assert line == (f"mahole connector: error: {config}: congestion-control: expected one "
                    "of reno, cubic, got 'vegas'")
    assert "cfg" not in served
    with pytest.raises(ValueError, match="unknown congestion control 'bbr'; choose one of "
                                         "reno, cubic"):
        AgentConfig(congestion_control="bbr")  # the library's users get the same check


@pytest.mark.parametrize("relay_only", [False, True], ids=["direct", "relay"])
@pytest.mark.parametrize("cc, controller", [("reno", "RenoCongestionControl"),
                                            (None, "CubicCongestionControl")])
def test_the_end_to_end_connections_use_the_chosen_congestion_control(relay_only, cc,
                                                                      controller):
    """Both members' end-to-end QUIC connection run the controller the node was given, or
    the default, CUBIC (the control connections keep aioquic's Reno), and bytes still arrive
    identical."""
    import os

    from aio_helpers import run
    from mahole.demo import LocalDeployment, tcp_round_trip

    chosen = {"congestion_control": cc} if cc else {}

    async def main_():
        async with LocalDeployment(agent_kwargs={**chosen, "relay_only": relay_only},
                                   connector_kwargs=chosen) as d:
            data = os.urandom(200_000)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            return ([type(s.connection.quic._loss._cc).__name__
                     for node in (d.agent, d.connector) for s in node.sessions.values()],
                    type(d.agent.control.connection.quic._loss._cc).__name__)
    assert run(main_()) == ([controller, controller], "RenoCongestionControl")


def test_relay_threads_by_flag_environment_or_file(tmp_path, monkeypatch, capsys, served):
    from mahole.config import relay_threads_count

    base = ["intermediate", "--allow", "*=*", *CREDS]
    assert main([*base, "--relay-threads", "3"]) == 0
    assert served["cfg"].relay_threads == 3
    assert main([*base, "--relay-threads", "auto"]) == 0
    assert served["cfg"].relay_threads == "auto"
    assert relay_threads_count("auto", cpus=6) == 6 and relay_threads_count(2) == 2
    monkeypatch.setenv("MAHOLE_RELAY_THREADS", "2")
    assert main(base) == 0 and served["cfg"].relay_threads == 2
    monkeypatch.delenv("MAHOLE_RELAY_THREADS")
    config = write(tmp_path / "inter.toml", "relay-threads = 4\n")
    assert main([*base, "--config", config]) == 0 and served["cfg"].relay_threads == 4
    served.clear()
    for bad in ("0", "-1", "two", "257", "1.5"):
        line = refused(capsys, *base, "--relay-threads", bad)
        assert line == ("mahole intermediate: error: argument --relay-threads: expected a "
                        f"number of relay threads 1-256 or auto, got {bad!r}"), line
    config = write(tmp_path / "bad.toml", "relay-threads = 0\n")
    line = refused(capsys, *base, "--config", config)
    assert line == (f"mahole intermediate: error: {config}: relay-threads: expected a number "
                    "of relay threads 1-256 or auto, got '0'"), line
    assert "cfg" not in served


# --- the send budget ------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["agent", "connector"])
def test_the_send_budget_comes_from_flag_environment_or_file(role, tmp_path, monkeypatch,
                                                             served):
    from mahole.config import NodeConfig

    assert main([role, *NODE_ARGS[role], *CREDS]) == 0
    assert served["cfg"].send_budget == NodeConfig.send_budget == 64 << 20
    assert main([role, *NODE_ARGS[role], "--send-budget", "1048576", *CREDS]) == 0
    assert served["cfg"].send_budget == 1 << 20
    config = write(tmp_path / "node.toml", "send-budget = 2097152\n")
    assert main([role, *NODE_ARGS[role], "--config", config, *CREDS]) == 0
    assert served["cfg"].send_budget == 2 << 20
    monkeypatch.setenv("MAHOLE_SEND_BUDGET", "65536")  # the environment beats the file
    assert main([role, *NODE_ARGS[role], "--config", config, *CREDS]) == 0
    assert served["cfg"].send_budget == 65536


def test_a_send_budget_below_one_read_is_one_line(tmp_path, capsys, served):
    from mahole.config import AgentConfig

    line = refused(capsys, "agent", *NODE_ARGS["agent"], "--send-budget", "1000", *CREDS)
    assert line == ("mahole agent: error: argument --send-budget: send-budget must be a whole "
                    "number of bytes, at least 65536, got 1000")
    config = write(tmp_path / "node.toml", "send-budget = 0\n")
    line = refused(capsys, "connector", *NODE_ARGS["connector"], "--config", config, *CREDS)
    assert line.startswith(f"mahole connector: error: {config}: send-budget") and "65536" in line
    assert "cfg" not in served
    with pytest.raises(ValueError, match="at least 65536"):
        AgentConfig(send_budget=4096)  # the library's users get the same check
