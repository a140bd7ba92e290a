"""API keys: `Authorization: Bearer <key>` on the API, checked in constant time; 401 in OpenAI's shape.

Keys come from `--api-key k1,k2` (or DSPARK_API_KEY) and/or `--api-key-file` (one per line, # comments). With no
key configured the API is open, as vLLM's is. /health is always open (probes); /metrics is open unless
`--protect-metrics true`. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def load_keys(api_key: str | None, api_key_file: str | None) -> list[bytes]:
    keys = [k.strip() for k in (api_key or "").split(",") if k.strip()]
    if api_key_file:
        path = Path(api_key_file)
        if not path.exists():
            raise ValueError(f"api_key_file {api_key_file} does not exist")
        keys += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    # Compare digests: equal length whatever the key, so the comparison leaks no length or prefix.
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def authorized(header: str | None, keys: list[bytes]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    given = hashlib.sha256(header[len("Bearer "):].strip().encode()).digest()
    ok = False
    for k in keys:  # no early exit: time does not depend on which key matched
        ok |= hmac.compare_digest(given, k)
    return ok


def needs_key(path: str, protect_metrics: bool) -> bool:
    return path.startswith("/v1/") or (protect_metrics and path.startswith("/metrics"))
