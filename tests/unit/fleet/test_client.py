"""The fleet client's checks that need no replica."""

from __future__ import annotations

import pytest

from lora_ops.errors import InputError
from lora_ops.fleet.client import check_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost:8001", "http://localhost:8001"),
        ("https://replica-1.internal:8443/", "https://replica-1.internal:8443"),
        ("http://[::1]:8001", "http://[::1]:8001"),
        ("http://10.0.0.7", "http://10.0.0.7"),
    ],
)
def test_check_url_keeps_scheme_host_and_port_without_the_trailing_slash(
    url: str, expected: str
) -> None:
    assert check_url(url) == expected


@pytest.mark.parametrize(
    "url", ["localhost:8001", "ftp://replica:21", "http://replica:8001/v1", "http://a b:80", ""]
)
def test_check_url_refuses_anything_but_an_http_host_and_port(url: str) -> None:
    with pytest.raises(InputError, match="is not an http") as refused:
        check_url(url)
    assert refused.value.field == "url"
