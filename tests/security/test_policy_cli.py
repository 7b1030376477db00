"""The intermediate's policy and quota flags: a bad value is one line and exit 2."""

import pytest

from mahole import signaling
from mahole.cli import build_parser, main
from mahole.config import IntermediateConfig


def test_a_bad_offer_rule_is_one_line_and_exit_2(capsys):
    from mahole.cli import main

    assert main(["intermediate", "--cert", "x.crt", "--key", "x.key", "--offer", "office"]) == 2
    err = capsys.readouterr().err
    assert err == ("mahole intermediate: error: expected CONNECTOR_GLOB=SERVICE_GLOB, "
                   "got 'office'\n")


@pytest.mark.parametrize("flag, value, text", [
    ("--sessions-per-agent", "0", "--sessions-per-agent must be > 0, got 0"),
    ("--signaling-rate", "-1", "--signaling-rate must be > 0, got -1.0"),
    ("--relay-rate-per-identity", "-5", "--relay-rate-per-identity must be >= 0, got -5"),
])
def test_a_bad_quota_is_one_line_and_exit_2(capsys, flag, value, text):
    assert main(["intermediate", "--cert", "x.crt", "--key", "x.key", flag, value]) == 2
    assert capsys.readouterr().err == f"mahole intermediate: error: {text}\n"


def test_flags_config_and_core_limits_share_names_and_defaults():
    args = build_parser().parse_args(["intermediate", "--cert", "x", "--key", "y",
                                      "--offer", "office=web", "--offer", "office-*=db"])
    assert args.offer == ["office=web", "office-*=db"]
    limits = signaling.Limits()
    for field in limits.__dataclass_fields__:
        assert getattr(args, field) == getattr(IntermediateConfig, field) \
            == getattr(limits, field), field
