"""Transfer tokens: signed for (node, dataset, expiry), short-lived, refused with a reason."""

from __future__ import annotations

import pytest

from selfheal import wire
from selfheal.transfer_tokens import MAX_TTL, bearer_token, check_transfer_token, sign_transfer_token

KEY = bytes(range(32))
NOW = 1_700_000_000.0


def token(**changes: object) -> str:
    fields: dict[str, object] = {"node": "node-a", "dataset": "model", "expires_at": NOW + 60}
    fields.update(changes)
    return sign_transfer_token(KEY, **fields)  # type: ignore[arg-type]


def check(value: str, *, key: bytes | None = KEY, node: str = "node-a", dataset: str = "model",
          now: float = NOW) -> str | None:
    return check_transfer_token(key, value, node=node, dataset=dataset, now=now)


def test_a_signed_token_checks_out_and_reads_plainly() -> None:
    value = token()
    assert value.startswith(f"sht1.node-a.model.{int(NOW) + 60}.")
    assert len(value.rsplit(".", 1)[1]) == 64
    assert check(value) is None
    assert token() == value  # deterministic
    assert token(expires_at=NOW + 0.2).split(".")[3] == str(int(NOW) + 1)  # rounded up


@pytest.mark.parametrize(("value", "kwargs", "reason"), [
    (token(), {"key": bytes(32)}, "bad signature"),
    (token(), {"key": None}, "this node has no command key"),
    (token(), {"node": "node-b"}, "token is for node 'node-a'"),
    (token(), {"dataset": "features"}, "token is for dataset 'model'"),
    (token(), {"now": NOW + 60}, "token expired"),
    (token(expires_at=NOW - 1), {}, "token expired"),
    (token(expires_at=NOW + MAX_TTL + 5), {}, "more than 3600 s ahead"),
    (token().replace(".model.", ".features."), {"dataset": "features"}, "bad signature"),
    (token().replace(f".{int(NOW) + 60}.", f".{int(NOW) + 600}."), {}, "bad signature"),
    (token()[:-1] + ("0" if token()[-1] != "0" else "1"), {}, "bad signature"),
    ("", {}, "not a transfer token"),
    ("sht1.node-a.model.123", {}, "not a transfer token"),
    (token().upper(), {}, "not a transfer token"),
    ("sht1.node-a.model.99999999999999.{}".format("0" * 64), {}, "not a transfer token"),
])
def test_bad_tokens_are_refused_with_a_reason(value: str, kwargs: dict[str, object], reason: str) -> None:
    refused = check(value, **kwargs)  # type: ignore[arg-type]
    assert refused is not None
    assert reason in refused


def test_a_command_signature_is_not_a_token() -> None:
    command = wire.sign_command(wire.Command(id="c", key="k", node="node-a", epoch=1, issued_at=NOW,
                                             expires_at=NOW + 60, step=wire.RestartUnit(unit="web")), KEY)
    forged = f"sht1.node-a.model.{int(NOW) + 60}.{command.sig}"
    assert check(forged) == "bad signature"


@pytest.mark.parametrize(("node", "dataset"), [("Node", "model"), ("node-a", "a.b"), ("", "model")])
def test_names_that_would_break_the_format_cannot_be_signed(node: str, dataset: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        sign_transfer_token(KEY, node=node, dataset=dataset, expires_at=NOW)


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None), (None, None),
])
def test_bearer_header_parsing(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected
