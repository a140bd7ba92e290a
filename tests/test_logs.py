"""Structured logs: with --log-format json every line is one JSON object; access and engine lines carry the request
id the client saw in X-Request-Id; neither the prompt text nor the API key is logged at INFO."""

import json
import logging

import httpx
from conftest import ServerProcess, wait_for

from dspark.logs import JsonFormatter, TextFormatter

KEY = "sk-log-test-5f1d2c"
PROMPT = "zebra quartz lantern"


def test_json_logs_carry_request_ids_and_no_prompt_or_key(model_dir):
    s = ServerProcess(model_dir, "--speculative", "none", "--log-format", "json", "--log-level", "info",
                      "--api-key", KEY)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(s.url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": s.name, "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert r.json()["id"] == f"cmpl-{rid}"
        denied = httpx.post(s.url + "/v1/completions", json={"model": s.name, "prompt": PROMPT},
                            headers={"Authorization": "Bearer sk-wrong-key"})
        assert denied.status_code == 401
        log_path = s.log_path
        assert wait_for(lambda: log_path.read_text().count('"dspark.access"') >= 2)
    finally:
        s.stop()
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    access = [x for x in records if x["logger"] == "dspark.access" and x["path"] == "/v1/completions"]
    assert {(x["request_id"], x["status"]) for x in access} >= {(rid, 200)}
    assert any(x["status"] == 401 for x in access)
    done = [x for x in records if x["msg"] == "request finished"]
    assert [x["request_id"] for x in done] == [f"cmpl-{rid}-0"]
    assert done[0]["completion_tokens"] == 4 and done[0]["finish_reason"] == "length"
    assert any(x["msg"] == "drain done" for x in records)
    assert PROMPT not in text and "zebra" not in text
    assert KEY not in text and "sk-wrong-key" not in text


def test_formatters_write_extra_fields():
    rec = logging.LogRecord("dspark.access", logging.INFO, __file__, 1, "GET %s", ("/health",), None)
    rec.request_id, rec.status = "abc", 200
    assert json.loads(JsonFormatter().format(rec)) | {"ts": 0} == {
        "ts": 0, "level": "INFO", "logger": "dspark.access", "msg": "GET /health", "request_id": "abc", "status": 200}
    assert TextFormatter().format(rec).endswith("dspark.access: GET /health request_id=abc status=200")
