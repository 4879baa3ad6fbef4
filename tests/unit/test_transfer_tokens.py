"""Transfer tokens: signed for (serving node, puller, dataset, paths, expiry), at most a minute, refused with why."""

from __future__ import annotations

import pytest

from selfheal import wire
from selfheal.transfer_tokens import (
    MAX_TTL,
    TransferGrant,
    bearer_token,
    check_transfer_token,
    paths_digest,
    sign_transfer_token,
    token_mac,
)

KEY = bytes(range(32))
NOW = 1_700_000_000.0
PATHS = ("models/weights.bin", "a.txt")


def token(**changes: object) -> str:
    fields: dict[str, object] = {"node": "node-a", "puller": "node-b", "dataset": "model", "paths": PATHS,
                                 "expires_at": NOW + 30}
    fields.update(changes)
    return sign_transfer_token(KEY, **fields)  # type: ignore[arg-type]


def check(value: str, *, key: bytes | None = KEY, node: str = "node-a", puller: str = "node-b",
          dataset: str = "model", paths: tuple[str, ...] = PATHS, now: float = NOW) -> TransferGrant | str:
    return check_transfer_token(key, value, node=node, puller=puller, dataset=dataset, paths=paths, now=now)


def test_a_signed_token_checks_out_and_reads_plainly() -> None:
    value = token()
    assert value.startswith(f"sht2.node-a.node-b.model.{int(NOW) + 30}.")
    assert len(value.rsplit(".", 1)[1]) == 64
    grant = check(value)
    assert isinstance(grant, TransferGrant)
    assert (grant.node, grant.puller, grant.dataset, grant.paths) == ("node-a", "node-b", "model", frozenset(PATHS))
    assert grant.mac == token_mac(value) == value.rsplit(".", 1)[1]
    assert token() == value  # deterministic
    assert token(expires_at=NOW + 0.2).split(".")[4] == str(int(NOW) + 1)  # rounded up
    assert check(value, paths=tuple(reversed(PATHS)) + PATHS) != "bad signature"  # order and repeats do not matter
    assert isinstance(check(value, paths=tuple(reversed(PATHS))), TransferGrant)


def test_a_nonce_makes_each_token_unique_and_is_covered_by_the_mac() -> None:
    """A file token opens one transfer, once: two commands signed in the same second must differ."""
    first, second = token(nonce="0123456789abcdef"), token(nonce="fedcba9876543210")
    assert first != second != token()
    assert first.split(".")[4:6] == [str(int(NOW) + 30), "0123456789abcdef"]
    grant = check(first)
    assert isinstance(grant, TransferGrant)
    assert grant.mac == token_mac(first) == first.rsplit(".", 1)[1] != token_mac(second)
    swapped = first.replace("0123456789abcdef", "fedcba9876543210")  # another nonce under the same MAC
    assert check(swapped) == "bad signature (or not signed for these paths)"
    dropped = first.replace(".0123456789abcdef", "")
    assert check(dropped) == "bad signature (or not signed for these paths)"
    with pytest.raises(ValueError, match="16 lowercase hex"):
        token(nonce="not-hex")


def test_the_path_list_digest_is_canonical_and_unambiguous() -> None:
    assert paths_digest(["b", "a", "a"]) == paths_digest(["a", "b"])
    assert paths_digest(["ab"]) != paths_digest(["a", "b"])
    assert paths_digest([]) != paths_digest([""])


def test_a_listings_only_token_covers_no_paths() -> None:
    listings = token(puller="controller", paths=())
    assert isinstance(check(listings, puller="controller", paths=()), TransferGrant)
    assert check(listings, puller="controller", paths=("a.txt",)) == "bad signature (or not signed for these paths)"


@pytest.mark.parametrize(("value", "kwargs", "reason"), [
    (token(), {"key": bytes(32)}, "bad signature"),
    (token(), {"key": None}, "this node has no command key"),
    (token(), {"node": "node-c"}, "token is for node 'node-a'"),
    (token(), {"puller": "node-c"}, "token is for puller 'node-b', not 'node-c'"),
    (token(), {"dataset": "features"}, "token is for dataset 'model'"),
    (token(), {"paths": ("a.txt",)}, "bad signature (or not signed for these paths)"),
    (token(), {"paths": (*PATHS, "etc/passwd")}, "bad signature (or not signed for these paths)"),
    (token(), {"now": NOW + 30}, "token expired"),
    (token(expires_at=NOW - 1), {}, "token expired"),
    (token(expires_at=NOW + MAX_TTL + 5), {}, "more than 60 s ahead"),
    (token().replace(".model.", ".features."), {"dataset": "features"}, "bad signature"),
    (token().replace(".node-b.", ".node-c."), {"puller": "node-c"}, "bad signature"),
    (token().replace(f".{int(NOW) + 30}.", f".{int(NOW) + 50}."), {}, "bad signature"),
    (token()[:-1] + ("0" if token()[-1] != "0" else "1"), {}, "bad signature"),
    ("", {}, "not a transfer token"),
    ("sht2.node-a.node-b.model.123", {}, "not a transfer token"),
    (token().upper(), {}, "not a transfer token"),
    ("sht2.node-a.node-b.model.99999999999999.{}".format("0" * 64), {}, "not a transfer token"),
    ("sht1.node-a.model.{}.{}".format(int(NOW) + 30, "0" * 64), {}, "version 1 transfer token"),
])
def test_bad_tokens_are_refused_with_a_reason(value: str, kwargs: dict[str, object], reason: str) -> None:
    refused = check(value, **kwargs)  # type: ignore[arg-type]
    assert isinstance(refused, str)
    assert reason in refused


def test_max_ttl_is_a_minute() -> None:
    assert MAX_TTL == 60.0
    assert isinstance(check(token(expires_at=NOW + 60)), TransferGrant)


def test_a_command_signature_is_not_a_token() -> None:
    command = wire.sign_command(wire.Command(id="c", key="k", node="node-a", epoch=1, issued_at=NOW,
                                             expires_at=NOW + 60, step=wire.RestartUnit(unit="web")), KEY)
    forged = f"sht2.node-a.node-b.model.{int(NOW) + 30}.{command.sig}"
    assert isinstance(check(forged), str)
    assert "bad signature" in str(check(forged))


@pytest.mark.parametrize(("node", "puller", "dataset"), [
    ("Node", "node-b", "model"), ("node-a", "node-b", "a.b"), ("", "node-b", "model"), ("node-a", "b.c", "model"),
])
def test_names_that_would_break_the_format_cannot_be_signed(node: str, puller: str, dataset: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        sign_transfer_token(KEY, node=node, puller=puller, dataset=dataset, paths=(), expires_at=NOW)


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None), (None, None),
])
def test_bearer_header_parsing(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected
