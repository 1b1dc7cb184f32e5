"""The test harness itself: address parsing and the event-index formula."""

from __future__ import annotations

import pytest
from consul_harness import HarnessError, event_index, parse_http_addr


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("http://consul.example:8500", ("http", "consul.example", 8500)),
        ("https://consul.example:8501/", ("https", "consul.example", 8501)),
        ("[::1]:8500", ("http", "::1", 8500)),
    ],
)
def test_parse_http_addr_accepts_the_consul_http_addr_forms(value, expected):
    assert parse_http_addr(value) == expected


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", "unix:///run/consul.sock", "http://host:port", "http://host:8500/v1", "ftp://host:21"],
)
def test_parse_http_addr_rejects_anything_else(value):
    with pytest.raises(HarnessError, match="FIREAP_TEST_CONSUL_HTTP_ADDR"):
        parse_http_addr(value)


def test_event_index_xors_the_two_halves_of_the_uuid():
    assert event_index("00000000-0000-0001-0000-000000000003") == 2
    assert event_index("ffffffff-ffff-ffff-0000-000000000000") == 2**64 - 1
    with pytest.raises(ValueError):
        event_index("not-a-uuid")
