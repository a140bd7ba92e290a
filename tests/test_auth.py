"""API keys: 401 in OpenAI's shape without the right Bearer key; /health open; /metrics open unless protected."""

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from dspark.server.auth import authorized, load_keys


def test_key_checks(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file\n\n")
    keys = load_keys(" k1 , k2 ", str(f))
    assert len(keys) == 3
    assert authorized("Bearer k2", keys) and authorized("Bearer k-file", keys)
    for bad in (None, "", "k1", "Bearer ", "Bearer k3", "Basic k1", "Bearer k1x"):
        assert not authorized(bad, keys), bad
    with pytest.raises(ValueError, match="does not exist"):
        load_keys(None, str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def locked(model_dir, tmp_path_factory):
    from conftest import ServerProcess

    f = tmp_path_factory.mktemp("auth") / "keys"
    f.write_text("from-file\n")
    s = ServerProcess(model_dir, "--speculative", "none", "--api-key", "alpha,beta", "--api-key-file", str(f),
                      "--protect-metrics", "true")
    yield s
    s.stop()


def test_api_needs_a_key(locked):
    body = {"model": locked.name, "prompt": "def f(", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha"}):
        r = httpx.post(locked.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and "key" in err["message"]
        assert "wrong" not in r.text
    assert httpx.get(locked.url + "/v1/models").status_code == 401
    for key in ("alpha", "beta", "from-file"):
        r = httpx.post(locked.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, key


def test_health_open_metrics_protected(locked):
    assert httpx.get(locked.url + "/health").status_code == 200
    assert httpx.get(locked.url + "/metrics").status_code == 401
    r = httpx.get(locked.url + "/metrics", headers={"Authorization": "Bearer beta"})
    assert r.status_code == 200 and 'dspark_requests_total{endpoint="/v1/completions",status="401"}' in r.text


def test_openai_client_gets_authentication_error(locked):
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=locked.url + "/v1", api_key="nope", max_retries=0).models.list()
    ok = OpenAI(base_url=locked.url + "/v1", api_key="alpha", max_retries=0)
    assert ok.completions.create(model=locked.name, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_open_server_needs_no_key_and_cors_is_off(server):
    r = httpx.options(server.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    assert httpx.get(server.url + "/v1/models").status_code == 200
