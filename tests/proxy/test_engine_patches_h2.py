"""engine_patches' HTTP/2 rules, on events hyper-h2 itself produced from real frames."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors

from luma_proxy.proxy.engine_patches import opened_and_reset, pool_has_room

HEADERS = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a.test")]


def server_events(send) -> list:
    """What a server-side H2Connection makes of the frames ``send(client)`` writes."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    send(client)
    return server.receive_data(client.data_to_send())


def test_streams_opened_and_reset_in_one_read_are_found() -> None:
    def flood(client) -> None:
        for stream in (1, 3, 5):
            client.send_headers(stream, HEADERS, end_stream=True)
            client.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        client.send_headers(7, HEADERS, end_stream=True)  # a normal request

    assert opened_and_reset(server_events(flood)) == {1, 3, 5}


def test_a_stream_with_a_body_or_reset_later_is_left_alone() -> None:
    def mixed(client) -> None:
        client.send_headers(1, HEADERS)
        client.send_data(1, b"body")  # its window must be acknowledged: kept
        client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        client.send_headers(3, HEADERS)  # reset comes in a later read: kept

    assert opened_and_reset(server_events(mixed)) == set()


def test_the_pool_bound() -> None:
    assert pool_has_room(0, 1) and pool_has_room(7, 8)
    assert not pool_has_room(8, 8) and not pool_has_room(9, 8)
