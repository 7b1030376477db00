"""`python -m mahole ROLE ...`: the command line of every role."""

import argparse
import logging
import sys

from . import __version__, certs_cli

ROLES = {
    "intermediate": "public QUIC server: authentication, address discovery, signaling, relay",
    "connector": "sits beside private apps and exposes named services to agents",
    "agent": "runs on the user's machine and exposes local forwards to services",
    "demo": "run an intermediate, a connector and an agent on loopback and check data flows",
}


def _not_implemented(args):
    print(f"mahole {args.command}: not implemented yet", file=sys.stderr)
    return 2


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mahole",
        description="Connect devices to private applications directly, peer to peer, "
                    "through NATs; relayed end-to-end encrypted when no direct path exists.",
    )
    parser.add_argument("--version", action="version", version=f"mahole {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="ROLE")
    commands.required = True
    for role, help_text in ROLES.items():
        sub = commands.add_parser(role, help=help_text, description=help_text)
        sub.set_defaults(func=_not_implemented)
    certs_cli.add_parser(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
