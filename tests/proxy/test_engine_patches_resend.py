"""engine_patches.may_resend: only what a container provably never answered, only when safe."""

from __future__ import annotations

import pytest

from luma_proxy.proxy.engine_patches import SERVER_CLOSED, may_resend

SAFE = {"method": "GET", "streamed": False, "answered": False, "sent": True, "retried": False,
        "message": SERVER_CLOSED}


def test_a_get_the_container_closed_under_is_sent_again() -> None:
    assert may_resend(**SAFE)
    assert may_resend(**{**SAFE, "method": "put"})  # idempotent, body held


@pytest.mark.parametrize("change", [
    {"method": "POST"}, {"method": "PATCH"},  # may have acted on it
    {"streamed": True},  # the body is gone: it cannot be sent again
    {"answered": True},  # a response byte came: the container took it
    {"sent": False},  # not sent whole (the client's body still coming)
    {"retried": True},  # MAX_RESENDS reached
    {"message": "Cannot parse HTTP response: bad"},  # the container answered, badly
    {"message": "killed"},
    {"cut": True},  # the proxy closed it (a response timeout): a slow container
])
def test_anything_else_keeps_its_error(change: dict) -> None:
    assert not may_resend(**{**SAFE, **change})
