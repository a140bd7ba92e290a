"""Train the embedded default model: a byte-level BPE tokenizer and a small Qwen3-shaped decoder.

    dspark train-target --out models/tiny-qwen3-5m --steps 900

Everything comes from `engine.training.corpus` (the interpreter's own stdlib), is deterministic under the
seed, and is written as a Hugging Face directory that `transformers` and our engine both load.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from dspark.engine.model import CausalLM
from dspark.engine.model_config import ModelConfig
from dspark.engine.tokenizer import CHATML_TEMPLATE, EOS, IM_END, IM_START, format_chatml
from dspark.engine.training.corpus import build_corpus, stdlib_dir

SPECIAL_TOKENS = [EOS, IM_START, IM_END]

DEFAULT_SHAPE = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_config(shape: dict, tok: Tokenizer, max_pos: int) -> dict:
    eos_ids = [tok.token_to_id(IM_END), tok.token_to_id(EOS)]
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        **shape, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": shape["num_hidden_layers"],
        "bos_token_id": tok.token_to_id(EOS), "eos_token_id": eos_ids, "pad_token_id": tok.token_to_id(EOS),
        "torch_dtype": "bfloat16", "use_cache": True,
    }


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "bos_token": None, "eos_token": IM_END, "pad_token": EOS, "unk_token": None,
        "add_bos_token": False, "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for t in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def sample_batch(streams, weights, batch, seq, gen):
    rows = []
    for _ in range(batch):
        s = streams[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, len(s) - seq - 1, (1,), generator=gen))
        rows.append(s[start : start + seq + 1])
    x = torch.stack(rows).long()
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, streams, seq, n=16, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in streams.items():
        x, y = sample_batch([s], torch.ones(1), n, seq, gen)
        h, _ = model(x)
        out[name] = F.cross_entropy(model.logits(h).flatten(0, 1), y.flatten()).item()
    return out


def save_model(model: CausalLM, cfg_dict: dict, outdir: Path) -> None:
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(outdir / "model.safetensors"), metadata={"format": "pt"})
    (outdir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (outdir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": cfg_dict["eos_token_id"], "pad_token_id": cfg_dict["pad_token_id"]}, indent=2))


def train_target(out: str, steps: int = 900, batch: int = 8, seq: int = 512, lr: float = 2e-3,
                 seed: int = 0, chat_weight: float = 0.4, threads: int | None = None,
                 save_every: int = 100, tokenizer_from: str | None = None, shape: dict | None = None) -> dict:
    """tokenizer_from: reuse that model's tokenizer (a standalone draft model must share its target's)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    corpus = build_corpus(seed)
    chat_docs = [format_chatml(m) for m in corpus.chat]
    shape = {**DEFAULT_SHAPE, **(shape or {})}
    if tokenizer_from:
        tok = Tokenizer.from_file(str(Path(tokenizer_from) / "tokenizer.json"))
        shape["vocab_size"] = tok.get_vocab_size()
    else:
        tok = train_tokenizer(corpus.code + chat_docs, shape["vocab_size"])
    save_tokenizer(tok, outdir, 2048)
    code_ids, chat_ids = token_stream(tok, corpus.code), token_stream(tok, chat_docs)
    held = {"code": token_stream(tok, corpus.heldout_code),
            "chat": token_stream(tok, [format_chatml(m) for m in corpus.heldout_chat])}
    print(f"corpus+tokenizer {time.time() - t0:.0f}s: code {len(code_ids)} tokens, chat {len(chat_ids)} tokens")

    cfg_dict = hf_config(shape, tok, 2048)
    model = CausalLM(ModelConfig.from_dict(cfg_dict))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * model.config.num_hidden_layers) if
                                                 name.endswith(("o_proj.weight", "down_proj.weight")) else 1))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1 - chat_weight, chat_weight])
    log = []
    t_train = time.time()
    bar = tqdm(range(steps), desc="train", mininterval=5)
    for step in bar:
        x, y = sample_batch([code_ids, chat_ids], weights, batch, seq, gen)
        h, _ = model(x)
        loss = F.cross_entropy(model.logits(h).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t_train, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if save_every and step and step % save_every == 0:
            save_model(model, cfg_dict, outdir)
    model.eval()
    heldout = evaluate(model, held, seq)
    train_seconds = time.time() - t_train
    save_model(model, cfg_dict, outdir)
    report = {
        "params": n_params, "steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed,
        "tokens_seen": steps * batch * seq, "train_seconds": round(train_seconds),
        "final_train_loss": log[-1]["loss"], "heldout_loss": {k: round(v, 4) for k, v in heldout.items()},
        "code_tokens": len(code_ids), "chat_tokens": len(chat_ids), "code_files": len(corpus.code),
        "chat_examples": len(corpus.chat), "python": platform.python_version(), "torch": torch.__version__,
        "stdlib": str(stdlib_dir()), "threads": torch.get_num_threads(), "log": log,
    }
    (outdir / "training_log.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))
    return report
