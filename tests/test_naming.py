"""The name rule and rlfleet's actor names (``rlfleet.buffer.naming``), without Ray."""

from __future__ import annotations

import pytest

from rlfleet.buffer import (
    DEFAULT_NAMESPACE,
    actor_name,
    check_name,
    check_namespace,
    parse_actor_name,
)
from rlfleet.buffer.naming import shard_actor_name

GOOD = ["cartpole", "a", "0", "Pong-v5.run_2", "x" * 64, "a.b", "a-", "9_", "run-2024.05.01"]

BAD = [
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("a/b", id="slash"),
    pytest.param("..", id="dotdot"),
    pytest.param("../x", id="parent"),
    pytest.param("a..b", id="inner-dotdot"),
    pytest.param("a:b", id="colon"),
    pytest.param(" a", id="leading-space"),
    pytest.param("a ", id="trailing-space"),
    pytest.param("_x", id="leading-underscore"),
    pytest.param("-lead", id="leading-dash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a\nb", id="newline"),
    pytest.param("é", id="non-ascii"),
    pytest.param(3, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"bytes", id="bytes"),
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_unchanged(name):
    assert check_name(name, argument="buffer name") == name
    assert check_namespace(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_naming_the_argument_the_value_and_the_rule(name):
    with pytest.raises(ValueError) as info:
        check_name(name, argument="buffer name")
    assert str(info.value) == (
        f"buffer name = {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
        f"letter or digit (it names Ray actors and directories)"
    )


@pytest.mark.parametrize("name", BAD)
def test_bad_namespaces_are_refused_with_the_same_rule(name):
    with pytest.raises(ValueError) as info:
        check_namespace(name)
    assert str(info.value).startswith(f"namespace = {name!r}: use 1-64 letters, digits")
    with pytest.raises(ValueError, match=r"^ray\.namespace = "):
        check_namespace(name, argument="ray.namespace")


def test_the_default_namespace_is_rlfleet():
    assert DEFAULT_NAMESPACE == "rlfleet"
    assert check_namespace(DEFAULT_NAMESPACE) == DEFAULT_NAMESPACE


@pytest.mark.parametrize("group, component, name", [
    ("cartpole", "shard-0", "rlfleet:cartpole:shard-0"),
    ("fleet-1", "collector-12", "rlfleet:fleet-1:collector-12"),
    ("fleet-1", "collectors", "rlfleet:fleet-1:collectors"),
    ("run.2", "learner-0", "rlfleet:run.2:learner-0"),
])
def test_actor_names_round_trip(group, component, name):
    assert actor_name(group, component) == name
    assert parse_actor_name(name) == (group, component)


def test_shard_actor_names_are_actor_names():
    assert shard_actor_name("t", 1) == "rlfleet:t:shard-1" == actor_name("t", "shard-1")
    assert parse_actor_name(shard_actor_name("cartpole", 127)) == ("cartpole", "shard-127")


@pytest.mark.parametrize("name", [
    "", "rlfleet", "rlfleet:", "rlfleet:a", "rlfleet::b", "rlfleet:a:", "rlfleet:a:b:c",
    "other:a:b", "xrlfleet:a:b", " rlfleet:a:b", None, 3,
])
def test_other_names_do_not_parse(name):
    assert parse_actor_name(name) is None
