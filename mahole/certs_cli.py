"""``python -m mahole certs``: create the deployment CA and issue node certificates.

    python -m mahole certs init  [--dir DIR] [--force] [--days N] [--ca-name CN]
    python -m mahole certs issue [--dir DIR] --role {intermediate,connector,agent} --name NAME
                                 [--host H ...] [--days N] [--force]

DIR defaults to ``certs`` (in the working directory): the documented home of a deployment's
certificates (certs/README.md), where the roles look for ``certs/ca.crt`` by default.

Wiring (in mahole/cli.py)::

    certs_parser = certs_cli.add_parser(subparsers)   # sets defaults func=certs_cli.run
    ...
    return args.func(args)

``run(args)`` needs only the namespace built by the parser from :func:`add_parser`; it prints
one line per file written and returns 0, or prints ``mahole certs: error: ...`` on stderr and
returns 2.
"""

from __future__ import annotations

import argparse
import sys

from . import identity

__all__ = ["add_parser", "run", "main", "DEFAULT_DIR"]

DEFAULT_DIR = "certs"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``certs`` command (with ``init`` and ``issue``) to an argparse subparsers action."""
    parser = subparsers.add_parser(
        "certs",
        help="create the deployment CA and issue node certificates",
        description="Create the deployment CA and issue certificates for mahole nodes. "
                    "Private keys are written with mode 0600; ca.key must stay secret.",
    )
    parser.set_defaults(func=run)
    commands = parser.add_subparsers(dest="certs_command", metavar="COMMAND")
    commands.required = True

    init = commands.add_parser(
        "init", help="create the deployment CA (DIR/ca.crt, DIR/ca.key)",
        description="Create the deployment CA: DIR/ca.crt (give it to every node) and "
                    "DIR/ca.key (keep it secret; needed only to issue certificates).")
    init.add_argument("--dir", default=DEFAULT_DIR,
                      help=f"directory for the CA files (default: {DEFAULT_DIR}, the "
                           "deployment's certificate folder, where the roles look for "
                           f"{DEFAULT_DIR}/ca.crt)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (every certificate it issued stops working)")
    init.add_argument("--days", type=_positive_int, default=3650,
                      help="validity in days (default: 3650)")
    init.add_argument("--ca-name", default="mahole deployment CA",
                      help="the CA's common name (default: %(default)s)")

    issue = commands.add_parser(
        "issue", help="issue a node certificate (DIR/NAME.crt, DIR/NAME.key)",
        description="Issue a certificate for one node, signed by the CA in DIR. The role and "
                    "name are written into the certificate (URI mahole://ROLE/NAME); for the "
                    "intermediate and connectors the name is also a DNS name in it.")
    issue.add_argument("--dir", default=DEFAULT_DIR,
                       help=f"directory holding the CA; output goes there too "
                            f"(default: {DEFAULT_DIR})")
    issue.add_argument("--role", required=True, choices=identity.ROLES,
                       help="the node's role")
    issue.add_argument("--name", required=True,
                       help="the node's name: 1-64 of A-Z a-z 0-9 . _ -")
    issue.add_argument("--host", dest="hosts", action="extend", nargs="+", default=None,
                       metavar="H",
                       help="extra DNS name or IP address the node is reached at "
                            "(repeatable), e.g. the intermediate's public address")
    issue.add_argument("--days", type=_positive_int, default=825,
                       help="validity in days (default: 825)")
    issue.add_argument("--force", action="store_true",
                       help="replace an existing certificate and key of that name")
    return parser


def _until(cert_path: str) -> str:
    cert = identity.load_certificate(cert_path)
    return identity.valid_until(cert).strftime("%Y-%m-%d %H:%M UTC")


def _init(args) -> None:
    cert_path, key_path = identity.init_ca(
        args.dir, name=getattr(args, "ca_name", "mahole deployment CA"),
        days=getattr(args, "days", 3650), force=getattr(args, "force", False))
    print(f"wrote CA certificate {cert_path} (valid until {_until(cert_path)}; "
          "give it to every node)")
    print(f"wrote CA private key {key_path} (mode 0600; keep it secret)")


def _issue(args) -> None:
    cert_path, key_path = identity.issue(
        args.dir, args.role, args.name, hosts=getattr(args, "hosts", None) or (),
        days=getattr(args, "days", 825), force=getattr(args, "force", False))
    print(f"wrote {args.role} certificate {cert_path} "
          f"({identity.URI_SCHEME}{args.role}/{args.name}, valid until {_until(cert_path)})")
    print(f"wrote {args.role} private key {key_path} (mode 0600)")


def run(args) -> int:
    """Carry out ``certs init`` / ``certs issue``; 0 on success, 2 after one error line."""
    command = getattr(args, "certs_command", None)
    try:
        if command == "init":
            _init(args)
        elif command == "issue":
            _issue(args)
        else:
            raise identity.IdentityError("choose a command: init or issue")
    except identity.IdentityError as exc:
        print(f"mahole certs: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"mahole certs: error: cannot write{where}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m mahole.certs_cli …``), mainly for testing."""
    parser = argparse.ArgumentParser(prog="mahole")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
