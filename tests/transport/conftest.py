"""What the transport layer's tests share: a loop (tests/support/transport.py),
closed after the test."""

from __future__ import annotations

import pytest
from support.transport import Loop


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.reactor.close()
