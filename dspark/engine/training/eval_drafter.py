"""`dspark eval-drafter`: acceptance of each shipped drafter on held-out prompts, per group and temperature.

Groups (`prompts.prompt_set("heldout")`, never trained on): code (HumanEval), chat (a held-out ShareGPT slice),
math (word problems from a separately seeded generator). Batch 1. Metrics, as DeepSpec defines them:
- tau: mean committed tokens per verification round, bonus included;
- draft tokens per round; acceptance rate at position p = P(accepted > p | proposed > p);
- confidence head (dspark): ECE (20 bins) and AUROC of the cumulative product of confidences against the
  accepted-prefix label, per drafted position, pooled; then tau and acceptance rate with the confidence cut on.
Calibration (per-position temperature on the confidence logits) is fitted on a separate held-out split.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from dspark.engine.drafters import save_drafter
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.report import replace_section
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.prompts import GROUPS, prompt_set


def heldout_prompts(tokenizer, per_group: int, seed: int, calibration: int = 0
                    ) -> dict[str, list[list[int]]] | tuple[dict, dict]:
    """Chat-formatted held-out prompts per group; with `calibration`, also a disjoint calibration set."""
    sets = prompt_set("heldout", per_group + calibration, lambda t: len(tokenizer.encode(t)), seed=seed)
    enc = {g: [tokenizer.encode_chat(m) for m in sets[g]] for g in GROUPS}
    if not calibration:
        return enc
    return {g: v[:per_group] for g, v in enc.items()}, {g: v[per_group:] for g, v in enc.items()}


def run_rounds(eng: LLMEngine, prompts: list[list[int]], temperature: float, max_tokens: int, threshold: float):
    eng.round_log = deque()
    eng.settings.confidence_threshold = threshold
    for i, p in enumerate(prompts):  # batch 1
        eng.generate([p], SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=1000 + i))
    return [r[:3] for r in eng.round_log]  # (verified, accepted, confidences); the proposer is one here


def summarize(rounds, block: int) -> dict:
    n = max(1, len(rounds))
    tau = sum(m + 1 for _, m, _ in rounds) / n
    per_pos = []
    for p in range(block):
        proposed = [m for k, m, _ in rounds if k > p]
        per_pos.append(sum(m > p for m in proposed) / len(proposed) if proposed else float("nan"))
    drafted = sum(k for k, _, _ in rounds)
    return {"tau": tau, "draft_per_round": drafted / n, "accept_rate": per_pos,
            "accepted_share": sum(m for _, m, _ in rounds) / max(1, drafted), "rounds": len(rounds)}


def confidence_metrics(rounds) -> dict:
    preds, labels = [], []
    for k, m, conf in rounds:
        surv = torch.tensor(conf[:k]).cumprod(0).tolist()
        preds += surv
        labels += [1.0 if j < m else 0.0 for j in range(k)]
    if not preds:
        return {"ece": float("nan"), "auroc": float("nan")}
    p, y = torch.tensor(preds), torch.tensor(labels)
    bins = (p * 20).clamp(max=19).long()
    ece = sum((bins == b).sum().item() / len(p) * abs(p[bins == b].mean() - y[bins == b].mean()).item()
              for b in range(20) if (bins == b).any())
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        auroc = float("nan")
    else:
        greater = (pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()
        auroc = greater.item()
    return {"ece": ece, "auroc": auroc}


def calibrate(eng: LLMEngine, prompts: list[list[int]], temperature: float, max_tokens: int) -> list[float]:
    """Per-position temperature on the confidence logit, minimising NLL of 'accepted given the earlier ones'."""
    drafter = eng.drafter
    drafter.conf_temperature.fill_(1.0)
    rounds = run_rounds(eng, prompts, temperature, max_tokens, 0.0)
    temps = []
    grid = torch.tensor([0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0])
    for i in range(drafter.cfg.block_size):
        logit, label = [], []
        for k, m, conf in rounds:
            if k > i and m >= i:  # position i was reached with all earlier tokens accepted
                c = min(max(conf[i], 1e-6), 1 - 1e-6)
                logit.append(torch.logit(torch.tensor(c)).item())
                label.append(1.0 if m > i else 0.0)
        if len(label) < 10:
            temps.append(1.0)
            continue
        z, y = torch.tensor(logit), torch.tensor(label)
        nll = [torch.nn.functional.binary_cross_entropy_with_logits(z / t, y).item() for t in grid]
        temps.append(float(grid[int(torch.tensor(nll).argmin())]))
    drafter.conf_temperature.copy_(torch.tensor(temps))
    return temps


def evaluate(model_dir: str, methods: list[str], per_group: int = 24, max_tokens: int = 96,
             thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8), write: str = "docs/benchmarks.md", seed: int = 0,
             save_calibration: bool = True, drafter: str | None = None) -> dict:
    results = {}
    for method in methods:
        # fixed: every round drafts the whole block, so tau measures the drafter, not the scheduler
        eng = LLMEngine(Settings(model=model_dir, speculative=method, drafter=drafter, draft_policy="fixed"))
        prompts, calib = heldout_prompts(eng.tokenizer, per_group, seed, calibration=per_group // 2)
        block = eng.drafter.cfg.block_size
        if eng.drafter.cfg.confidence_head:
            temps = calibrate(eng, [p for g in GROUPS for p in calib[g]], 1.0, max_tokens)
            print(f"{method}: confidence temperatures per position {temps}")
            if save_calibration:
                save_drafter(eng.drafter, eng.settings.drafter_path)
        for temp in (0.0, 1.0):
            for g in GROUPS:
                rounds = run_rounds(eng, prompts[g], temp, max_tokens, 0.0)
                row = summarize(rounds, block)
                if eng.drafter.cfg.confidence_head:
                    row.update(confidence_metrics(rounds))
                    for th in thresholds:
                        cut = summarize(run_rounds(eng, prompts[g], temp, max_tokens, th), block)
                        row[f"cut{th}"] = {"tau": cut["tau"], "draft_per_round": cut["draft_per_round"],
                                           "accepted_share": cut["accepted_share"]}
                results[(method, temp, g)] = row
                print(method, f"T={temp}", g, f"tau={row['tau']:.2f}", f"draft/round={row['draft_per_round']:.2f}",
                      "rate@p=" + ",".join(f"{x:.2f}" for x in row["accept_rate"]),
                      *(f"ece={row['ece']:.3f} auroc={row['auroc']:.3f}",) if "ece" in row else ())
    if write:
        merged = merge_results(Path(write).with_name("acceptance.json"), results, per_group, max_tokens)
        write_markdown(Path(write), merged, thresholds, per_group, max_tokens)
    return results


def merge_results(path: Path, results: dict, per_group: int, max_tokens: int) -> dict:
    """Results of earlier runs (other methods, same settings) kept beside this run's, in `path` (JSON): each
    drafter can be evaluated as soon as it is trained."""
    import json

    old = json.loads(path.read_text()) if path.exists() else {}
    keep = {} if old.get("settings") != [per_group, max_tokens] else old.get("rows", {})
    done = {m for m, _, _ in results}
    rows = {k: v for k, v in keep.items() if k.split("|")[0] not in done}
    rows.update({f"{m}|{t}|{g}": r for (m, t, g), r in results.items()})
    path.write_text(json.dumps({"settings": [per_group, max_tokens], "rows": rows}, indent=1))
    order = {m: i for i, m in enumerate(("dspark", "dflash", "eagle3"))}
    keys = sorted(rows, key=lambda k: (order.get(k.split("|")[0], 9), float(k.split("|")[1]), k.split("|")[2]))
    return {(k.split("|")[0], float(k.split("|")[1]), k.split("|")[2]): rows[k] for k in keys}


def write_markdown(path: Path, results, thresholds, per_group, max_tokens) -> None:
    methods = list(dict.fromkeys(m for m, _, _ in results))
    lines = ["<!-- bench:acceptance -->", "## Drafter acceptance on held-out prompts (default model, block 7)", "",
             f"Command: `dspark eval-drafter --methods {','.join(methods)} --per-group {per_group} --max-tokens "
             f"{max_tokens}` (methods may be evaluated in separate runs with the same settings: "
             f"docs/acceptance.json keeps each one's rows). Batch 1; {per_group} prompts per group, up to "
             f"{max_tokens} new tokens each. "
             "tau = committed tokens per round incl. the bonus; rate@p = P(accepted > p | proposed > p) (DeepSpec's "
             "definition); ECE / AUROC of the calibrated confidences' running product against the accepted-prefix "
             "label; 'cut t': drafts stop where a calibrated confidence falls below t (accepted share = accepted / "
             "drafted tokens).", "",
             "| method | T | group | tau | draft tok/round | accept rate @ position 1..7 | ECE | AUROC | "
             + " | ".join(f"tau / accepted share, cut {t}" for t in thresholds) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(thresholds)]
    for (m, t, g), r in results.items():
        cut = [f"{r[f'cut{th}']['tau']:.2f} / {100 * r[f'cut{th}']['accepted_share']:.0f}%" if f"cut{th}" in r
               else "-" for th in thresholds]
        lines.append(f"| {m} | {t} | {g} | {r['tau']:.2f} | {r['draft_per_round']:.2f} | "
                     + " ".join(f"{x:.2f}" for x in r["accept_rate"]) + " | "
                     + (f"{r['ece']:.3f} | {r['auroc']:.3f}" if "ece" in r else "- | -") + " | "
                     + " | ".join(cut) + " |")
    lines += macro_ratios(results)
    lines += ["", "Confidence cuts are swept for dspark only (the others have no confidence head)."]
    lines += ["", "<!-- /bench:acceptance -->"]
    replace_section(path, "acceptance", "\n".join(lines))


PAPER_RATIO = {"dflash": 1.17, "eagle3": 1.30}  # DSpark paper: macro tau of DSpark over DFlash / EAGLE-3


def macro_ratios(results) -> list[str]:
    """tau(dspark) / tau(other), macro-averaged over groups (mean of tau per group), per temperature."""
    temps = sorted({t for _, t, _ in results})
    out = []
    for other, paper in PAPER_RATIO.items():
        for t in temps:
            a = [r["tau"] for (m, tt, _), r in results.items() if m == "dspark" and tt == t]
            b = [r["tau"] for (m, tt, _), r in results.items() if m == other and tt == t]
            if a and b and len(a) == len(b):
                out.append(f"| dspark / {other} | {t} | {sum(a) / len(a):.2f} / {sum(b) / len(b):.2f} = "
                           f"{sum(a) / sum(b):.2f}x | {paper:.2f}x |")
    if not out:
        return []
    return ["", "Macro tau (mean over groups) of dspark over the other drafters, beside the DSpark paper's ratios:", "",
            "| ratio | T | tau | paper |", "|---|---|---|---|", *out]
