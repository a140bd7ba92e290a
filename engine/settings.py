"""All settings in one pydantic model: defaults < configs/*.yaml < DSPARK_* env vars < CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "dspark-default"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSPARK_", extra="forbid")

    # model
    model: str = Field(str(DEFAULT_MODEL), description="local Hugging Face model directory")
    served_model_name: str | None = Field(None, description="name clients use; default: the directory's name")
    device: str = "cpu"
    dtype: str = Field("float32", description="float32 | bfloat16 | float16")
    attention_backend: str = Field("torch", description="torch (reference) | flashinfer (CUDA)")
    max_model_len: int | None = Field(None, description="context limit; default: the model's")
    # speculative decoding
    speculative: str = Field("none", description="none | dspark | dflash | eagle3 | auto (dspark if shipped)")
    drafter: str | None = Field(None, description="drafter directory; default: the shipped one for the method")
    draft_len: int = Field(7, description="most draft tokens per request per step")
    confidence_threshold: float = Field(0.0, description="cut a draft where the confidence head falls below this")
    draft_policy: str = Field("adaptive", description="adaptive (draft lengths from load, confidence and SLOs) "
                              "| fixed (always draft_len, cut only by confidence_threshold)")
    min_draft_len: int = Field(0, description="adaptive policy: fewest draft tokens verified for a drafting request")
    # scheduling and admission
    slo_tokens_per_s: float = Field(0.0, description="default per-user tokens/s target (0 = none); per request: "
                                    "the slo_tokens_per_s request field")
    max_waiting: int = Field(256, description="bounded waiting queue: past it, requests get 429 (0 = unbounded)")
    # KV cache and batching
    block_size: int = 16
    kv_cache_memory_mb: int = Field(512, description="memory for the paged KV cache")
    num_kv_blocks: int | None = Field(None, description="overrides kv_cache_memory_mb")
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    max_n: int = 16
    max_stop_sequences: int = 16
    log_level: str = "info"
    log_format: str = Field("text", description="text | json (one JSON object per line: access and engine logs "
                            "with request ids; never prompt text or API keys)")
    drain_grace_s: float = Field(30.0, description="on SIGTERM: stop admitting (/ready 503, new requests 503), "
                                 "let in-flight requests finish for up to this many seconds, then exit 0")
    drain_retry_after_s: int = Field(5, description="Retry-After sent with the 503s while draining")
    api_key: str | None = Field(None, description="API key(s), comma-separated; clients send Authorization: "
                                "Bearer <key>. None and no api_key_file = open API")
    api_key_file: str | None = Field(None, description="file with one API key per line (# comments)")
    protect_metrics: bool = Field(False, description="require an API key for /metrics too (/health stays open)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")
    max_request_bytes: int = Field(2_000_000, description="larger request bodies get 413")
    threads: int | None = Field(None, description="torch CPU threads; default: torch's choice")

    @property
    def speculative_method(self) -> str:
        if self.speculative != "auto":
            return self.speculative
        if self.drafter:
            return json.loads((Path(self.drafter) / "config.json").read_text())["method"]
        return "dspark" if (Path(self.model) / "drafters" / "dspark" / "config.json").exists() else "none"

    @property
    def drafter_path(self) -> Path | None:
        method = self.speculative_method
        if method == "none":
            return None
        return Path(self.drafter) if self.drafter else Path(self.model) / "drafters" / method

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def load_settings(config: str | Path | None = None, **overrides) -> Settings:
    """YAML file (default configs/default.yaml), then env vars, then explicit overrides (CLI flags)."""
    path = Path(config) if config else Path(os.environ.get("DSPARK_CONFIG", DEFAULT_CONFIG))
    data = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    env_set = {k for k in Settings.model_fields if f"DSPARK_{k.upper()}" in os.environ}
    data = {k: v for k, v in data.items() if k not in env_set}  # env beats the file
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**data)
