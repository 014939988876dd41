"""TLS to Redis for real: a private redis-server speaking TLS only (rediss://), reached through the
config's mapping (redis.ssl_ca_file) by the state store and by `cascade check`'s Redis probe."""

from __future__ import annotations

import pytest
import redis

from cascade.config import load_config
from cascade.state import make_state
from devtools.services import make_test_certificates, start_redis
from workers.check import _redis as check_redis  # the Redis half of `cascade check`

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis(tmp_path):
    tls = make_test_certificates(tmp_path / "certs")
    handle = start_redis(run_dir=tmp_path, tls=tls)
    yield handle, tls
    handle.stop()


def test_rediss_with_the_configured_ca(tls_redis):
    handle, tls = tls_redis
    assert handle.url.startswith("rediss://")
    config = load_config(None, redis={"url": handle.url, "ssl_ca_file": str(tls.ca_file)}, state={"backend": "redis"})
    state = make_state(config)
    assert state.ping()
    assert state.claim_events(["e1"]) == [True] and state.seen(["e1", "e2"]) == [True, False]
    assert all(c.ok for c in check_redis(config))
    # The server's certificate is signed by a CA the system does not know: without ssl_ca_file the
    # connection is refused, not silently unverified.
    unverified = load_config(None, redis={"url": handle.url}, state={"backend": "redis"})
    assert not make_state(unverified).ping()
    assert not all(c.ok for c in check_redis(unverified))
    with pytest.raises(redis.ConnectionError):  # and the port speaks nothing but TLS
        redis.Redis.from_url(handle.url.replace("rediss://", "redis://"), socket_timeout=2).ping()
