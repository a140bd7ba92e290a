"""schemathesis against the server's own /openapi.json: both completion endpoints, streaming and not.

Generated requests (valid and invalid ones) must never get a 5xx, and every error must be in OpenAI's shape.
A small context (128) and n <= 2 keep each generated request cheap; examples per operation are bounded.
(schemathesis makes the hypothesis strategies; hypothesis runs them, so no pytest plugin is involved.)"""

import json

import httpx
import pytest
import schemathesis
from conftest import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 100


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    s = ServerProcess(model_dir, "--speculative", "none", "--max-model-len", "128", "--max-n", "2")
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generated_requests_never_5xx_and_errors_are_openai_shaped(fuzz_server, path):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen = {"2xx": 0, "4xx": 0, "stream": 0}

    def with_model(triple):  # half the cases name the served model, so generation runs too (not only 404s)
        case, fix, stream = triple
        if fix and isinstance(case.body, dict):
            case.body["model"] = fuzz_server.name
            if stream:  # a valid core, the other generated fields kept: streamed answers get exercised too
                case.body.update(stream=True, n=1, max_tokens=8)
                case.body.pop("max_completion_tokens", None)
                if "prompt" in case.body:
                    case.body["prompt"] = "def f("
                else:
                    case.body["messages"] = [{"role": "user", "content": "hi"}]
        return case

    strategy = st.tuples(schema[path]["POST"].as_strategy(), st.booleans(), st.booleans()).map(with_model)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    def run(case):
        # sent with httpx: schemathesis' own transport cut streamed bodies short
        r = httpx.post(fuzz_server.url + path, content=json.dumps(case.body), timeout=120,
                       headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text[:300]
        if r.status_code >= 400:
            seen["4xx"] += 1
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
        else:
            seen["2xx"] += 1
            if "text/event-stream" in r.headers.get("content-type", ""):
                seen["stream"] += 1
                assert r.text.rstrip().endswith("data: [DONE]") and '"server_error"' not in r.text

    run()
    print(path, seen)
    assert seen["4xx"] > 0 and seen["2xx"] > 0 and seen["stream"] > 0, seen  # invalid, valid, streamed ones
