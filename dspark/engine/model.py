"""Llama / Qwen-family decoder in plain PyTorch, with Hugging Face weight names.

One forward serves both training and serving: without attention metadata it runs dense causal attention
over a [batch, seq] block; with metadata it takes a flat list of tokens from many requests and attends over
the paged KV cache through the attention backend in `kernels/`.
"""

from __future__ import annotations

import functools
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dspark.engine.gguf_model import find_gguf, open_gguf
from dspark.engine.model_config import ModelConfig
from dspark.engine.quantization import Quantizer, int4_fits, takes_stored_codes
from dspark.kernels.base import AttentionBackend


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of x^2 over the last dim as a fixed tree of elementwise adds (halve, then add the odd ends last).

    Elementwise float adds round the same in eager aten and in Inductor's C++ (no FMA contraction, no reordering),
    so eager and compiled steps get the same bits from this, where a reduction kernel's summation order is the
    kernel's own (Inductor's fused norm and aten's differed in the last bit). About 2 log2(n) small ops."""
    s, ends = x * x, []
    while s.shape[-1] > 1:
        half = s.shape[-1] // 2
        if s.shape[-1] % 2:
            ends.append(s[..., 2 * half:])
        s = s[..., :half] + s[..., half:2 * half]
    for end in reversed(ends):
        s = s + end
    return s


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fixed_order = False  # CausalLM.fixed_order_norms_(): eager and compiled steps give the same bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), in fewer dispatched ops
        fp32 = x.dtype == torch.float32 and self.weight.dtype == torch.float32
        xf = x if fp32 else x.float()
        if not self.fixed_order:
            y = F.rms_norm(xf, self.weight.shape, self.weight if fp32 else None, self.eps)
        else:
            y = xf * torch.rsqrt(sum_of_squares(xf) / xf.shape[-1] + self.eps)
            y = self.weight * y if fp32 else y
        return y if fp32 else self.weight * y.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq.float()
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return (inv_freq / rs["factor"]).float()
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: one divisor per frequency (Llama 3.1 scaling)
        return (inv_freq / torch.tensor(rs["factors"], dtype=torch.float64)).float()
    if kind == "llama3":
        factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin table indexed by absolute position (HF's rotate-half convention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._cache_len = 0
        self._cos = self._sin = None
        self.reserved = False  # set by reserve(): the table covers every position, forward() reads none back

    def _extend(self, n: int, device: torch.device) -> None:
        n = max(n, 2 * self._cache_len, 256)
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos, self._sin, self._cache_len = emb.cos(), emb.sin(), n

    def reserve(self, n: int, device: torch.device) -> None:
        """Build the table for positions 0..n-1 now, and stop checking positions against it: the check reads the
        largest position back from the device (a sync on CUDA, and a capture error inside a CUDA graph). The
        caller guarantees every position is < n (the engine's max_model_len)."""
        self._extend(n, torch.device(device))
        self.reserved = True

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reserved:
            need = int(positions.max()) + 1 if positions.numel() else 1
            if need > self._cache_len or self._cos.device != positions.device:
                self._extend(need, positions.device)
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `rope_swapped` (computed once per forward, not per layer)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope_swapped(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rope with the sign folded into the table: the halves swap in one flip, and the result is bit-for-bit
    apply_rope's ((-a) * s == a * (-s) in IEEE arithmetic)."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


def _dnn_packable(w: torch.Tensor) -> bool:
    """oneDNN's pre-packed linear, for a CPU weight: bf16 needs a CPU with AVX512-BF16 (AMX for the fast path)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if w.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return w.dtype == torch.float32


# Rows (tokens) for which a packed fp32 weight beats at::linear (MKL) on an Intel CPU (tuned on a Xeon): MKL's
# sgemv wins for 1-2 rows and large blocks come out even, but 4..256 rows (batched decode, verification, short
# prefill chunks) run 1.3-2.4x faster packed. bf16 packed wins at every size.
FP32_PACKED_ROWS = (4, 256)
ALL_ROWS = (1, 1 << 62)


@functools.cache
def mkl_off_intel() -> bool:
    """True where at::linear's fp32 GEMM is MKL on a non-Intel x86 CPU (e.g. AMD EPYC), which MKL runs on a
    generic code path: there oneDNN's packed fp32 linear is faster at every row count (measured on an AVX2 EPYC,
    2 threads: 2x at 1 row, 2-4x at 2-16 rows, 3x for the LM head at verification sizes), and MKL's results for a
    row change with the number of rows while oneDNN's do not, so a verification step scores each token exactly
    as a one-token decode step would."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available():
        return False
    try:
        vendor = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("vendor_id")), "")
    except OSError:
        return False
    return bool(vendor) and "GenuineIntel" not in vendor


class ServingLinear:
    """One serving-time projection: the weights of one or more HF Linear layers concatenated along the output
    (q|k|v, gate|up), so a step runs one matmul instead of several.

    On CPU a bf16 weight is also re-laid out once for oneDNN (`pack`) and every call runs on its AMX /
    AVX512-BF16 kernels: 1.3-2x faster than at::linear's bf16 path at decode sizes, same numbers. fp32 weights are
    packed only on request (`pack_fp32`): the plain weight must stay for 1-3 rows (MKL's sgemv is faster there),
    so it costs a second copy of the weights for about +10% batch-8 decode (none at batch 1 or 32). Where MKL runs
    off Intel (`mkl_off_intel`) fp32 weights are packed by default and every call takes the packed path.
    `pack_fp32`: None = that default, True / False = always / never."""

    def __init__(self, linears: list[nn.Linear], pack: bool = True, pack_fp32: bool | None = None):
        ws = [lin.weight.detach() for lin in linears]
        self.weight = torch.cat(ws) if len(ws) > 1 else ws[0]
        bs = [lin.bias for lin in linears]
        self.bias = None if bs[0] is None else torch.cat([b.detach() for b in bs])
        self.packed, self.rows = None, (0, 0)
        fp32, off_intel = self.weight.dtype == torch.float32, mkl_off_intel()
        if pack and _dnn_packable(self.weight) and (not fp32 or (off_intel if pack_fp32 is None else pack_fp32)):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            self.rows = FP32_PACKED_ROWS if fp32 and not off_intel else ALL_ROWS
        if len(linears) > 1:  # the HF modules become views of the fused weight: one copy in memory, and
            off = 0            # state_dict() / the dense path still see the same values under HF names
            for lin, w in zip(linears, ws):
                lin.weight = nn.Parameter(self.weight[off : off + w.shape[0]], requires_grad=False)
                if self.bias is not None:
                    lin.bias = nn.Parameter(self.bias[off : off + w.shape[0]], requires_grad=False)
                off += w.shape[0]

    @classmethod
    def of(cls, weight: torch.Tensor) -> ServingLinear:
        """One projection over a weight [out, in] that no module holds (e.g. some rows of an LM head)."""
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        return cls([lin])

    per_row = False  # `--deterministic`: every row its own call, so its bits never depend on the step's rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_row and x.numel() // x.shape[-1] > 1:
            flat = x.reshape(-1, x.shape[-1])
            return torch.cat([self._one(flat[i : i + 1]) for i in range(len(flat))]).view(*x.shape[:-1], -1)
        return self._one(x)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.rows[0] <= x.numel() // x.shape[-1] <= self.rows[1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = self.head_dim**-0.5
        self.qkv: ServingLinear | None = None  # set by CausalLM.fuse_()
        self.o: ServingLinear | None = None

    def forward(self, x, cos, sin, backend: AttentionBackend | None, kv_cache, sin_signed=None) -> torch.Tensor:
        """x [..., hidden]; cos/sin [..., 1, head_dim] (broadcast over heads); `sin_signed` (see rope_swapped) when
        the caller has it, which makes RoPE one call for q and k together."""
        lead = x.shape[:-1]
        h, hkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv is not None:  # fused projection (CausalLM.fuse_)
            qkv = self.qkv(x).view(*lead, h + 2 * hkv, d)
            if not self.qk_norm and sin_signed is not None:
                qk = rope_swapped(qkv[..., : h + hkv, :], cos, sin_signed)
                q, k, v = qk[..., :h, :], qk[..., h:, :], qkv[..., h + hkv :, :]
                return self._attend(q, k, v, lead, backend, kv_cache)
            q, k, v = qkv.split([h, hkv, hkv], dim=-2)
        else:
            q = self.q_proj(x).view(*lead, h, d)
            k = self.k_proj(x).view(*lead, hkv, d)
            v = self.v_proj(x).view(*lead, hkv, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if sin_signed is not None:
            q, k = rope_swapped(q, cos, sin_signed), rope_swapped(k, cos, sin_signed)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._attend(q, k, v, lead, backend, kv_cache)

    def _attend(self, q, k, v, lead, backend, kv_cache) -> torch.Tensor:
        if backend is None:  # dense causal block [B, S, H, D] (training, reference)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=self.n_kv != self.n_heads,
            ).transpose(1, 2)
        else:  # flat tokens [T, H, D] over the paged cache
            o = backend.forward(self.layer_idx, q, k, v, kv_cache, self.scale)
        o = o.reshape(*lead, self.n_heads * self.head_dim)
        return self.o(o) if self.o is not None else self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up: ServingLinear | None = None  # set by CausalLM.fuse_()
        self.down: ServingLinear | None = None

    def forward(self, x):
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, backend, kv_cache, sin_signed=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, kv_cache, sin_signed)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class CausalLM(nn.Module):
    """`model.*` + `lm_head` exactly as HF's *ForCausalLM, so checkpoints load unchanged."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._lm_head: ServingLinear | None = None  # set by fuse_()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
        kv_caches: list | None = None,
        hidden_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return final-norm hidden states, plus the outputs of `hidden_layers` (0 = embeddings) for drafters."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads, once for all layers
        sin_signed = signed_sin(sin)
        taps = [x] if 0 in hidden_layers else []
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, backend, kv_caches[i] if kv_caches is not None else None, sin_signed)
            if i + 1 in hidden_layers:
                taps.append(x)
        return self.model.norm(x), taps

    def row_invariant_(self) -> CausalLM:
        """`--deterministic`: float projections run one row per call (quantized ones compute each row alone
        already), so a token's logits are the same bits in a decode step and in a verification step."""
        self.fuse_()
        for proj in [self._lm_head, *(p for layer in self.model.layers for p in (
                layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down))]:
            if isinstance(proj, ServingLinear):
                proj.per_row = True
        return self

    def fixed_order_norms_(self, on: bool = True) -> CausalLM:
        """Every RMSNorm sums its squares in a fixed order (model.sum_of_squares), the one way to get the same
        bits eagerly and from an Inductor graph: the engine turns it on with its compiled decode
        (dspark/engine/compiled.py), so prefill, eager verification and compiled steps score a token alike."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fixed_order = on
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._lm_head is not None:
            return self._lm_head(hidden).float()
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def fuse_(self, pack: bool = True, pack_fp32: bool | None = None, quantizer: Quantizer | None = None) -> CausalLM:
        """Serving layout, in place, after loading: q|k|v and gate|up each become one projection (the HF modules
        stay, as views of the fused weights, so state_dict() and HF names are unchanged), and bf16 CPU weights
        get a oneDNN-packed copy (see ServingLinear; `pack=False` skips that, `pack_fp32=True` packs fp32 weights
        too, for batched decode, at the cost of a second copy; None packs them where MKL runs off Intel).
        Idempotent.

        A `quantizer` (dspark/engine/quantization.py) makes each projection it can quantize a QuantLinear and
        drops the float weights of the decoder's projections (their HF modules are left on the meta device). The LM
        head is quantized too, at every row count: a row's logits must not depend on how many rows the step has
        (verification would score drafts otherwise than decoding would), and its float weight stays only for the
        drafters and where it is the embedding (tied).

        Call it last: converting the model (`.to(dtype)`) afterwards would leave the fused copies behind."""
        if self._lm_head is not None:
            return self

        def serving(linears: list[nn.Linear], names: list[str]):
            q = quantizer(linears, names) if quantizer is not None else None
            if q is None:
                return ServingLinear(linears, pack, pack_fp32)
            for lin in linears:  # the quantized copy is the only one kept
                lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)
            return q

        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            pre = f"model.layers.{i}."
            a.qkv = serving([a.q_proj, a.k_proj, a.v_proj], [pre + f"self_attn.{p}_proj.weight" for p in "qkv"])
            a.o = serving([a.o_proj], [pre + "self_attn.o_proj.weight"])
            m.gate_up = serving([m.gate_proj, m.up_proj], [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"])
            m.down = serving([m.down_proj], [pre + "mlp.down_proj.weight"])
        q = quantizer([self.lm_head], ["lm_head.weight"], head=True) if quantizer is not None else None
        self._lm_head = q or ServingLinear([self.lm_head], pack, pack_fp32)
        return self


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantization: str = "none", group_size: int = 32, shard=None) -> CausalLM:
    """Load a local HF directory (config.json + model.safetensors or sharded *.safetensors) or a GGUF file.

    With `quantization` int8 / int4 the model comes back fused (CausalLM.fuse_) on quantized projections; a GGUF's
    Q4_0 / Q4_1 projections are then read as int4 codes and never dequantized.

    `shard` (dspark/engine/parallel.py's TPShard): one tensor-parallel rank's model, shaped to its heads, MLP
    columns and vocabulary rows, each tensor sliced as it is read (safetensors' slices, a GGUF's rows before
    they are dequantized), so the whole model is never resident."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    if shard is not None:
        return _load_shard(path, cfg, dtype, device, quantization, shard)
    with torch.device("meta"):
        model = CausalLM(cfg)
    gguf = find_gguf(path)
    if gguf is not None:
        ckpt = open_gguf(gguf)
        names = [k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
        direct = set()
        if takes_stored_codes(quantization, group_size) and device == "cpu":
            direct = {n for n in names if n.removesuffix(".weight").rpartition(".")[2] in PROJECTIONS
                      and int4_fits(*model.get_parameter(n).shape, 32) and ckpt.stores_q4(n)}
        model = _assign(model, ckpt.state_dict([n for n in names if n not in direct], dtype, device), cfg, device)
        return _quantize(model, quantization, group_size, ckpt.int4_codes, device)
    files = _checkpoint_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f), device=device))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:5]}...")
    model = _assign(model, {k: v.to(dtype) for k, v in state.items() if k in expected}, cfg, device)
    return _quantize(model, quantization, group_size, None, device)


def _checkpoint_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in path.glob("*.safetensors"))


def load_tensors(path: str | Path, names: list[str], dtype: torch.dtype, device: str = "cpu",
                 spec=lambda name: None) -> dict[str, torch.Tensor]:
    """Some of a checkpoint's tensors (HF names), each cut to `spec(name)` = (dim, lo, hi) or whole (None) as it is
    read: safetensors through get_slice, a GGUF's rows before they are dequantized."""
    path = Path(path)
    gguf = find_gguf(path)
    if gguf is not None:
        return open_gguf(gguf).state_dict(names, dtype, device, spec)
    files = _checkpoint_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    out, want = {}, set(names)
    for f in files:
        with safe_open(str(path / f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if k not in want:
                    continue
                cut = spec(k)
                if cut is None:
                    t = fh.get_tensor(k)
                else:
                    dim, lo, hi = cut
                    sl = fh.get_slice(k)
                    t = sl[lo:hi] if dim == 0 else sl[:, lo:hi]
                out[k] = t.to(device=device, dtype=dtype)
    return out


def _load_shard(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, quantization: str, shard) -> CausalLM:
    from dspark.engine.parallel import finish_shard, local_config, shard_spec

    if quantization != "none":
        raise ValueError(f"--quantization {quantization} with --tensor-parallel-size {shard.world}: quantized "
                         "projections are not sharded yet (their packed codes and group scales would need slicing "
                         "along both dimensions); use --quantization none")
    local = local_config(cfg, shard)
    with torch.device("meta"):
        model = CausalLM(local)
    expected = [k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = {k: shard_spec(k, cfg, shard) for k in expected}
    read = [k for k in expected if spec[k] != (0, 0, 0)]  # a rank-past-0 row-parallel bias is zeros, not read
    state = load_tensors(path, read, dtype, device, lambda k: spec.get(k))
    missing = set(read) - state.keys()
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:5]}...")
    empty = torch.empty(0, dtype=dtype, device=device)
    state = {k: finish_shard(k, state.get(k, empty), cfg, shard, shapes[k]) for k in expected}
    return _assign(model, state, local, device)


def _quantize(model: CausalLM, scheme: str, group_size: int, codes, device: str) -> CausalLM:
    if scheme == "none":
        return model
    if device != "cpu":
        raise ValueError(f"--quantization {scheme} runs on torch's CPU kernels; on {device} use --quantization none")
    quantizer = Quantizer(scheme, group_size, codes)
    model.fuse_(quantizer=quantizer)
    model.quantizer = quantizer  # what was quantized, and how, for the engine's ready log
    return model


def _assign(model: CausalLM, state: dict[str, torch.Tensor], cfg: ModelConfig, device: str) -> CausalLM:
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()
