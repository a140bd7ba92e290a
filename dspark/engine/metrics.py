"""Every Prometheus metric the server exports, in one place (names prefixed `dspark_`).

With several API servers (--api-server-count N > 1) the launcher sets PROMETHEUS_MULTIPROC_DIR before they
start, so each process writes its values to files there and /metrics merges them: counters and histograms are
summed over the API servers (each counts its own requests; the core's step counters reach API server 0 alone, so
they are counted once). Gauges say how they merge: `livesum` for the ones each API server counts over its own
requests, `mostrecent` for the core's own, which only API server 0 sets. With one API server none of this applies:
one process, the default registry.

Beside them, the Gateway API Inference Extension's model-server protocol: its endpoint picker (and llm-d's)
scrapes the queue depth, the running count, the KV cache usage and the block size under vLLM's names (the
protocol's table, docs/proposals/003-model-server-protocol in kubernetes-sigs/gateway-api-inference-extension),
so those are exported under `vllm:` names too, set wherever their `dspark_` twins are.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("dspark_requests", "HTTP requests finished", ["endpoint", "status"])
PROMPT_TOKENS = Counter("dspark_prompt_tokens", "Prompt tokens admitted")
GENERATION_TOKENS = Counter("dspark_generation_tokens", "Tokens generated")
FINISHED = Counter("dspark_request_finished", "Sequences finished", ["reason"])
TTFT = Histogram("dspark_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
ITL = Histogram("dspark_inter_token_latency_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS)
E2E = Histogram("dspark_request_latency_seconds", "Request latency, arrival to finish", buckets=LATENCY_BUCKETS)
RUNNING = Gauge("dspark_num_requests_running", "Sequences in the running batch", multiprocess_mode="livesum")
WAITING = Gauge("dspark_num_requests_waiting", "Sequences waiting for admission", multiprocess_mode="livesum")
KV_USAGE = Gauge("dspark_kv_cache_usage_ratio", "Fraction of KV blocks in use", multiprocess_mode="mostrecent")
KV_FREE = Gauge("dspark_kv_free_blocks", "Free KV blocks", multiprocess_mode="mostrecent")
KV_TOTAL = Gauge("dspark_kv_total_blocks", "KV blocks in the pool", multiprocess_mode="mostrecent")
PREEMPTIONS = Counter("dspark_preemptions", "Sequences preempted for recompute")
PREFIX_QUERIES = Counter("dspark_prefix_cache_queries", "Prompt tokens of admitted requests looked up in the "
                         "prefix cache")
PREFIX_HITS = Counter("dspark_prefix_cache_hits", "Prompt tokens found in the prefix cache (their prefill skipped)")
PREFIX_EVICTIONS = Counter("dspark_prefix_cache_evictions", "Cached KV blocks evicted (contents dropped, least "
                           "recently released first) to make room")
PREFIX_BLOCKS = Gauge("dspark_prefix_cache_blocks", "Cached KV blocks nobody holds (reusable, evicted LRU on demand)",
                      multiprocess_mode="mostrecent")
STEP_TOKENS = Histogram("dspark_batch_tokens_per_step", "Tokens run per engine step",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
SPEC_ROUNDS = Counter("dspark_spec_rounds", "Draft-and-verify rounds", ["drafter"])
SPEC_DRAFT_TOKENS = Counter("dspark_spec_draft_tokens", "Draft tokens verified by the target", ["drafter"])
SPEC_ACCEPTED_TOKENS = Counter("dspark_spec_accepted_tokens", "Draft tokens accepted", ["drafter"])
# per draft position j (0 = the first draft token): verified at j, accepted at j (every token before it accepted
# too); their ratio is the acceptance rate at j, as vLLM's spec_decode_num_accepted_tokens_per_pos
SPEC_POSITION_DRAFTED = Counter("dspark_spec_draft_tokens_per_pos", "Draft tokens verified, per draft position",
                                ["drafter", "position"])
SPEC_POSITION_ACCEPTED = Counter("dspark_spec_accepted_tokens_per_pos", "Draft tokens accepted, per draft position",
                                 ["drafter", "position"])
STEP_BYTES_TO_HOST = Histogram("dspark_step_bytes_to_host", "Bytes a step copies from the logits' device to the host "
                               "(accepted counts, tokens, requested logprobs)",
                               buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304))
STEP_TIME = Histogram("dspark_step_seconds", "Engine step wall time", buckets=LATENCY_BUCKETS)
DRAFT_LEN = Histogram("dspark_draft_length", "Draft tokens verified per speculating request per step",
                      ["drafter"], buckets=tuple(range(0, 17)))
ACCEPT_LEN = Histogram("dspark_acceptance_length", "Tokens committed per speculative round (accepted + bonus)",
                       ["drafter"], buckets=tuple(range(1, 18)))
SPS = Gauge("dspark_steps_per_second", "Step cost model: verification steps/s at this many batch tokens",
            ["batch_tokens"], multiprocess_mode="mostrecent")
GUARD_RATE = Gauge("dspark_draft_guard_tokens_per_second", "Draft policy's realized-rate guard: running tokens/s of "
                   "decode steps without drafters (false) and with greedy / sampled drafters, per batch-size band",
                   ["batch", "drafting"], multiprocess_mode="mostrecent")
SCHEDULER_TIME = Histogram("dspark_scheduler_seconds", "Scheduler and draft-policy time per step",
                           buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))
REQUEST_TPS = Histogram("dspark_request_tokens_per_second", "Per-request decode speed after the first token",
                        buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000))
SLO_REQUESTS = Counter("dspark_slo_requests", "Finished requests that had a tokens/s target", ["met"])
SLO_ATTAINMENT = Gauge("dspark_slo_attainment_ratio", "Share of the last 1000 requests with a target that met it",
                       multiprocess_mode="mostrecent")
REJECTED = Counter("dspark_rejected_requests", "Requests turned away (429: waiting queue full)", ["reason"])

# GIE model-server protocol (vLLM's names): TotalQueuedRequests, TotalRunningRequests, KVCacheUtilization (a 0-1
# fraction, as vLLM's), and the optional BlockSize / NumGPUBlocks labels of the cache config info.
GIE_WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting for admission (GIE TotalQueuedRequests)",
                    ["model_name"], multiprocess_mode="livesum")
GIE_RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch (GIE TotalRunningRequests)",
                    ["model_name"], multiprocess_mode="livesum")
GIE_KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (GIE KVCacheUtilization)", ["model_name"],
                     multiprocess_mode="mostrecent")
GIE_CACHE_INFO = Gauge("vllm:cache_config_info", "KV cache configuration (GIE BlockSize, NumGPUBlocks labels)",
                       ["block_size", "num_gpu_blocks", "enable_prefix_caching"], multiprocess_mode="mostrecent")
