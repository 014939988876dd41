"""A real authenticated Redis connection through the mapping (an ACL user on a private Redis)."""

from __future__ import annotations

import pytest
import redis

from cascade.config import load_config
from cascade.state import make_state

pytestmark = pytest.mark.integration


def test_acl_user_through_the_config(private_redis, tmp_path, monkeypatch):
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", "cascade-app", "on", ">app-pa55", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")  # anonymous connections now refused
    url = f"redis://{private_redis.host}:{private_redis.port}/0"
    (tmp_path / "pw").write_text("app-pa55\n")
    state = make_state(load_config(None, redis={"url": url, "username": "cascade-app", "password_file": str(tmp_path / "pw")},
                                   state={"backend": "redis"}))
    assert state.claim_events(["e1"]) == [True] and state.seen(["e1"]) == [True]
    monkeypatch.setenv("CASCADE_REDIS__PASSWORD", "wrong")
    wrong = make_state(load_config(None, redis={"url": url, "username": "cascade-app"}, state={"backend": "redis"}))
    assert not wrong.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()
