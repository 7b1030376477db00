"""The intermediate's edge flags: defaults from IntermediateConfig, bad values one line."""

import pytest

from mahole.cli import build_parser, main
from mahole.config import IntermediateConfig

FLAGS = {"--max-half-open": "max_half_open", "--retry-threshold": "retry_threshold",
         "--max-half-open-per-source": "max_half_open_per_source",
         "--handshake-timeout": "handshake_timeout", "--stun-rate": "stun_rate",
         "--vn-rate": "vn_rate"}


def test_edge_flags_default_to_the_config_and_reach_it():
    base = ["intermediate", "--cert", "x.crt", "--key", "x.key"]
    args = build_parser().parse_args(base)
    for field in FLAGS.values():
        assert getattr(args, field) == getattr(IntermediateConfig, field)
    args = build_parser().parse_args(base + ["--max-half-open", "9", "--retry-threshold", "0",
                                             "--handshake-timeout", "0.5", "--stun-rate", "2",
                                             "--vn-rate", "0"])
    assert (args.max_half_open, args.retry_threshold, args.handshake_timeout, args.stun_rate,
            args.vn_rate) == (9, 0, 0.5, 2.0, 0.0)


@pytest.mark.parametrize("flag, value, message", [
    ("--handshake-timeout", "0", "--handshake-timeout must be > 0"),
    ("--max-half-open", "0", "--max-half-open must be > 0"),
    ("--retry-threshold", "-1", "--retry-threshold must be >= 0"),
    ("--stun-rate", "-2", "--stun-rate must be >= 0"),
])
def test_a_bad_edge_flag_is_one_line_and_exit_2(capsys, flag, value, message):
    assert main(["intermediate", "--cert", "x.crt", "--key", "x.key", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
