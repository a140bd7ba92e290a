"""dspark: an OpenAI-compatible LLM server with DSpark speculative decoding.

The one import root of the project; its parts are `dspark.server` (HTTP API and CLI), `dspark.engine` (model,
KV cache, drafters, the step), `dspark.scheduler`, `dspark.kernels` (attention backends) and `dspark.loadtest`.
"""

__version__ = "0.1.0"
