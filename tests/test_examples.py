"""The examples in examples/ run as a user runs them, against a real intermediate on
loopback, and do what they say; docs/api.md names every public name and nothing else."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mahole
import mahole.api

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name):
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_http_request_through_open_connection():
    out = run_example("http_request.py")
    assert re.match(r"HTTP/1.0 200 OK via (direct|relay)\n", out), out
    assert out.endswith("hello from the private network\n")


def test_chat_with_an_in_process_service():
    assert run_example("chat.py") == "office: got hi\noffice: got is the printer fixed?\n"


def test_watching_path_changes():
    out = run_example("watch_failover.py")
    lines = out.splitlines()
    assert lines[0] == "starts on relay", out
    assert "now direct (nominated)" in lines, out
    assert lines[-1].startswith("now none"), out


@pytest.mark.parametrize("name", sorted(mahole.api.__all__))
def test_every_public_name_is_exported_and_documented(name):
    assert getattr(mahole, name) is getattr(mahole.api, name)
    assert f"`mahole.{name}" in (ROOT / "docs" / "api.md").read_text(), name


def test_the_docs_name_nothing_that_does_not_exist():
    text = (ROOT / "docs" / "api.md").read_text()
    for dotted in set(re.findall(r"`mahole\.([A-Za-z_][\w.]*)", text)):
        obj = mahole
        for part in dotted.split("."):
            assert hasattr(obj, part), f"docs/api.md names mahole.{dotted}"
            obj = getattr(obj, part)


@pytest.mark.parametrize("cls, var", [(mahole.Agent, "agent"), (mahole.Session, "session"),
                                      (mahole.Connector, "connector"),
                                      (mahole.Intermediate, "intermediate")])
def test_every_public_method_and_property_is_documented(cls, var):
    text = (ROOT / "docs" / "api.md").read_text()
    names = {name for klass in cls.__mro__[:-1] for name in vars(klass)
             if not name.startswith("_")}
    missing = [name for name in names if f"{var}.{name}" not in text]
    assert not missing, f"docs/api.md does not mention {var}.{', '.join(sorted(missing))}"
