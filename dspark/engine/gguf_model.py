"""GGUF checkpoints: weights, config, tokenizer and chat template read from one file with the `gguf` library.

llama.cpp's converter renames tensors (`blk.N.attn_q.weight`), stores the shape in its own metadata keys
(`llama.block_count`, ...) and, for the llama architecture, permutes the q/k projections for its interleaved
RoPE. This module maps all of it back to what `engine.model` loads from a Hugging Face directory: an HF-style
config dict, HF tensor names (through gguf's own `TensorNameMap`), rotate-half q/k, and a `tokenizers` object
built from the vocabulary, merges and pre-tokenizer type in the file. Quantized tensors are dequantized by
`gguf.quants` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants and whatever else it implements).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp writes Mistral checkpoints as arch "llama"; these need the q/k permutation undone.
PERMUTED_QK = {"llama"}

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's names for the HF tokenizers it recognises).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # name -> (split digits one by one first, main regex)
    "default": (False, _GPT2), "gpt2": (False, _GPT2), "gpt-2": (False, _GPT2),
    "smollm": (True, _GPT2), "starcoder": (True, _GPT2), "refact": (True, _GPT2), "codeshell": (True, _GPT2),
    "llama3": (False, _LLAMA3), "llama-bpe": (False, _LLAMA3), "smaug-bpe": (False, _LLAMA3),
    "qwen2": (False, _QWEN2), "qwen35": (False, _QWEN2),
}
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values: special, added, byte-fallback tokens


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one *.gguf in a directory without config.json."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); name one")
        return files[0] if files else None
    return None


def model_name(path: Path) -> str:
    """A served name from a GGUF file name: the stem without its quantization suffix."""
    return re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16|f16|f32|bf16)$", "", path.stem)


@dataclass
class GGUFCheckpoint:
    path: Path
    arch: str
    meta: dict  # every metadata key -> its value
    tensors: dict  # GGUF tensor name -> gguf ReaderTensor (memory-mapped)
    _name_map: object = field(default=None, repr=False)  # the gguf library's HF -> GGUF name table, made once

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def hf_config(self) -> dict:
        """The checkpoint's shape as a Hugging Face config.json dict (what ModelConfig.from_dict reads)."""
        heads = self.get("attention.head_count")
        hidden = self.get("embedding_length")
        cfg = {
            "architectures": [ARCHITECTURES[self.arch]],
            "vocab_size": self.get("vocab_size") or len(self.meta["tokenizer.ggml.tokens"]),
            "hidden_size": hidden,
            "intermediate_size": self.get("feed_forward_length"),
            "num_hidden_layers": self.get("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.get("attention.head_count_kv", heads),
            "head_dim": self.get("attention.key_length", hidden // heads),
            "rms_norm_eps": self.get("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self.get("rope.freq_base", 10000.0),
            "max_position_embeddings": self.get("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.eos_ids(),
        }
        kind = self.get("rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise ValueError(f"{self.path.name}: RoPE scaling {kind!r} is not supported (linear is)")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": self.get("rope.scaling.factor")}
        if "rope_freqs.weight" in self.tensors:  # Llama 3.1-style scaling, stored as per-frequency divisors
            cfg["rope_scaling"] = {"rope_type": "freq_factors",
                                   "factors": self.dequantize("rope_freqs.weight").tolist()}
        return cfg

    def eos_ids(self) -> list[int]:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return sorted({self.meta[k] for k in keys if self.meta.get(k) is not None})

    def dequantize(self, name: str) -> np.ndarray:
        from gguf import quants

        t = self.tensors[name]
        try:
            data = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{self.path.name}: tensor {name} has type {t.tensor_type.name}, which the gguf "
                             f"library cannot dequantize") from e
        return data.reshape(tuple(int(d) for d in reversed(t.shape)))

    def gguf_name(self, hf: str) -> str:
        """The file's tensor name for an HF parameter name (through the gguf library's own name table)."""
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

        if self._name_map is None:
            arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == self.arch)
            self._name_map = get_tensor_name_map(MODEL_ARCH(arch), self.get("block_count"))
        gname = self._name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None or gname not in self.tensors:
            raise ValueError(f"{self.path.name}: no tensor for {hf} (looked for {gname})")
        return gname

    def _unpermute(self, gname: str, w: torch.Tensor) -> torch.Tensor:
        """llama.cpp's q / k row order undone, head by head (w's rows are whole heads: all of them, or a
        tensor-parallel shard's)."""
        if self.arch in PERMUTED_QK and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            return unpermute_qk(w, w.shape[0] // self.hf_config()["head_dim"])
        return w

    def stores_q4(self, hf: str) -> bool:
        """Whether the file stores this weight as Q4_0 / Q4_1 (int4 codes `int4_codes` reads as they are)."""
        return self.tensors[self.gguf_name(hf)].tensor_type.name in ("Q4_0", "Q4_1")

    def int4_codes(self, hf: str):
        """A weight's int4 codes as the file stores them (Q4_0 / Q4_1: dspark/engine/quantization.py), rows in
        HF's order; None for any other type."""
        from dspark.engine.quantization import gguf_q4_codes

        try:
            gname = self.gguf_name(hf)
        except ValueError:  # e.g. a tied LM head: the file has no tensor of its own
            return None
        t = self.tensors[gname]
        shape = tuple(int(d) for d in reversed(t.shape))
        codes = gguf_q4_codes(t.data, t.tensor_type.name, shape) if len(shape) == 2 else None
        return None if codes is None else tuple(self._unpermute(gname, c) for c in codes)

    def state_dict(self, names: list[str], dtype: torch.dtype, device: str = "cpu",
                   spec=lambda name: None) -> dict[str, torch.Tensor]:
        """HF-named tensors for `names` (the model's parameter names), dequantized into `dtype`; `spec(name)` =
        (dim, lo, hi) keeps only those rows (dim 0) or columns (dim 1) of a tensor (a tensor-parallel shard)."""
        out = {}
        for hf in names:
            gname = self.gguf_name(hf)
            cut = spec(hf)
            if cut is None:  # a copy below: the file is read-only
                w = torch.from_numpy(np.array(self.dequantize(gname), dtype=np.float32))
                out[hf] = self._unpermute(gname, w).to(device=device, dtype=dtype)
            else:
                out[hf] = self._slice(gname, *cut).to(device=device, dtype=dtype)
        return out

    def _slice(self, gname: str, dim: int, lo: int, hi: int) -> torch.Tensor:
        """Rows or columns lo..hi-1 of a tensor (HF's orientation: [out, in]), read without dequantizing the rest
        where the layout allows: rows always (a quantized row is its own run of blocks), columns of an unquantized
        tensor, or of a quantized one at block boundaries; else the one tensor is dequantized whole, then cut."""
        from gguf import GGML_QUANT_SIZES, quants

        t = self.tensors[gname]
        shape = tuple(int(d) for d in reversed(t.shape))
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        data = t.data
        if dim == 0:
            data = data[lo:hi]
            shape = (hi - lo, *shape[1:])
        elif block == 1 or (lo % block == 0 and hi % block == 0):
            data = data[:, lo // block * size : hi // block * size] if block > 1 else data[:, lo:hi]
            shape = (shape[0], hi - lo)
        else:
            w = torch.from_numpy(np.array(self.dequantize(gname), dtype=np.float32))
            return w[:, lo:hi].contiguous()
        w = np.array(quants.dequantize(np.ascontiguousarray(data), t.tensor_type), dtype=np.float32).reshape(shape)
        w = torch.from_numpy(w)
        return self._unpermute(gname, w) if dim == 0 else w


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file once (its metadata parse is slow in Python: a vocabulary is tens of thousands of
    fields); tensors stay memory-mapped until dequantized. A rewritten file is parsed again."""
    path = Path(path).resolve()
    st = path.stat()
    return _open_gguf(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open_gguf(path: Path, _mtime_ns: int, _size: int) -> GGUFCheckpoint:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {}
    for key, value in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = value.contents()
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path.name}: architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)} (Mistral GGUFs are written as llama)")
    return GGUFCheckpoint(path, arch, meta, {t.name: t for t in reader.tensors})


def build_tokenizer(ckpt: GGUFCheckpoint):
    """A `tokenizers.Tokenizer` equal to the file's vocabulary: byte-level BPE ("gpt2" models) built here,
    SentencePiece-style ("llama" models) through transformers' GGUF converter when it is installed."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    meta = ckpt.meta
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{ckpt.path.name}: pre-tokenizer {pre!r} is not supported; supported: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
        digits, regex = PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                                     ignore_merges=pre in ("llama3", "llama-bpe", "smaug-bpe")))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                convert_gguf_tokenizer,
                get_gguf_tokenizer,
            )
        except ImportError as e:
            raise ValueError(f"{ckpt.path.name}: SentencePiece ('llama') GGUF tokenizers are built by "
                             "transformers' GGUF converter: pip install 'transformers>=5.2'") from e
        arch, info, _ = get_gguf_tokenizer(str(ckpt.path))
        tok, _ = convert_gguf_tokenizer(arch, info)
        return tok
    else:
        raise ValueError(f"{ckpt.path.name}: tokenizer model {kind!r} is not supported (gpt2, llama are)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok
