"""`dspark loadtest sweep`: per-user vs total tokens/s for each speculation mode over a range of concurrencies.

It starts the real server for every mode (subprocesses on free loopback ports), drives them in turn with the
closed-loop load generator at each concurrency (several times over, in rotating order, with `repeats`), and
reads the server's own /metrics before and after each run for the acceptance length and the scheduler's share
of step time. Output: JSON, a markdown table and a PNG chart (x = per-user tokens/s, y = total tokens/s, one
curve per mode, points labelled by concurrency).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dspark.loadtest.loadgen import (
    LoadConfig,
    all_users_rate,
    builtin_prompts,
    closed_loop,
    paired_speedup,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]

MODES = {
    "none": ["--speculative", "none"],
    "k=1": ["--speculative", "dspark", "--draft-policy", "fixed", "--draft-len", "1"],
    "k=4": ["--speculative", "dspark", "--draft-policy", "fixed", "--draft-len", "4"],
    "k=7": ["--speculative", "dspark", "--draft-policy", "fixed", "--draft-len", "7"],
    "dspark adaptive": ["--speculative", "dspark", "--draft-policy", "adaptive"],
    "ngram": ["--speculative", "ngram"],
    "dspark+ngram": ["--speculative", "dspark+ngram", "--draft-policy", "adaptive"],
    "default": [],  # the configured defaults (configs/default.yaml), as `peers --dspark=` serves them
}


def free_port() -> int:
    """A loopback port nothing listens on right now (for a server process we are about to start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ok(url: str) -> bool:
    """GET url answers 200 (False while the server is not up yet)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Server:
    """`dspark serve` in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, flags: list[str], log_dir: Path | None = None, ready_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log" if log_dir else None  # its stdout and stderr
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "dspark", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} (flags {flags})")
            if answers_ok(self.url + "/health"):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy")

    @property
    def model(self) -> str:
        """The served model's name (needs an open API: no --api-key)."""
        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed by name plus labels."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def scrape(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)


def _delta(after: dict, before: dict, prefix: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))


def _by_drafter(after: dict, before: dict) -> dict[str, list[float]]:
    """{proposer: [rounds, draft tokens, accepted tokens]} over a run, from the counters' drafter label (a hybrid's
    rounds are counted under the proposer whose draft was verified)."""
    out: dict[str, list[float]] = {}
    for j, name in enumerate(COUNTERS[:3]):
        for k, v in after.items():
            m = re.fullmatch(name + r'\{drafter="([^"]*)"\}', k)
            if m:
                out.setdefault(m.group(1), [0.0, 0.0, 0.0])[j] += v - before.get(k, 0.0)
    return out


COUNTERS = ("dspark_spec_rounds_total", "dspark_spec_draft_tokens_total", "dspark_spec_accepted_tokens_total",
            "dspark_step_seconds_sum", "dspark_scheduler_seconds_sum")


def measure(server: Server, prompts: list[dict], users: int, requests_per_user: int, max_tokens: int,
            temperature: float, slo: float, ignore_eos: bool = True) -> dict:
    """One closed-loop run: its requests, wall time, and the server's speculation counters over it."""
    cfg = LoadConfig(server.url, server.model, prompts, max_tokens, temperature, slo, ignore_eos=ignore_eos)
    before = scrape(server.url)
    results, wall = asyncio.run(closed_loop(cfg, users, requests_per_user))
    after = scrape(server.url)
    counters = {k: _delta(after, before, k) for k in COUNTERS}
    return {"results": results, "wall": wall, "counters": counters, "all_users": all_users_rate(results, users),
            "drafters": _by_drafter(after, before)}


def combine(runs: list[dict], users: int) -> dict:
    """One sweep point from one or more runs at the same concurrency: figures over all their requests and wall
    time together, plus each run's total tokens/s (the spread a single run hides on a noisy machine)."""
    results = [r for run in runs for r in run["results"]]
    s = summarize(results, sum(run["wall"] for run in runs))
    c = {k: sum(run["counters"][k] for run in runs) for k in COUNTERS}
    rounds, accepted = c["dspark_spec_rounds_total"], c["dspark_spec_accepted_tokens_total"]
    step_s = c["dspark_step_seconds_sum"]
    ok = [r for r in results if r.ok]
    s.update(requests_tps=[round(r.tokens_per_s, 2) for r in ok], requests_tokens=[r.tokens for r in ok],
             requests_prompt=[r.prompt for r in ok])
    per: dict[str, list[float]] = {}
    for run in runs:
        for d, xs in run.get("drafters", {}).items():
            per[d] = [a + b for a, b in zip(per.get(d, [0.0, 0.0, 0.0]), xs)]
    s["proposers"] = {d: {"rounds_share": r / rounds, "tau": (r + acc) / r, "draft_per_round": dt / r}
                      for d, (r, dt, acc) in per.items() if r and rounds}
    s.update(concurrency=users, tau=(rounds + accepted) / rounds if rounds else None,
             draft_per_round=c["dspark_spec_draft_tokens_total"] / rounds if rounds else None,
             scheduler_share=c["dspark_scheduler_seconds_sum"] / step_s if step_s else None,
             runs_total_tokens_per_s=[round(summarize(run["results"], run["wall"])["total_tokens_per_s"], 2)
                                      for run in runs],
             # the rate while all the point's users were active (no drain at the end): loadgen.all_users_rate
             all_users_tokens_per_s=sum(run["all_users"][0] for run in runs)
             / max(sum(run["all_users"][1] for run in runs), 1e-9))
    return s


def run_point(server: Server, prompts: list[dict], users: int, requests_per_user: int, max_tokens: int,
              temperature: float, slo: float) -> dict:
    return combine([measure(server, prompts, users, requests_per_user, max_tokens, temperature, slo)], users)


def sweep(modes: list[str], concurrencies: list[int], prompt_set: str = "mixed", max_tokens: int = 64,
          temperature: float = 0.0, slo: float = 0.0, requests_total: int = 32, server_flags: list[str] = (),
          out_dir: str = "docs", name: str | None = None, write_md: str | None = "docs/benchmarks.md",
          repeats: int = 1, ignore_eos: bool = True) -> dict:
    """Every mode's server runs for the whole sweep, and at each concurrency the modes take turns, `repeats`
    times in rotating order: a machine whose speed drifts by 10-20% over minutes (a shared VM) then slows every
    mode alike, where one mode after another would charge the drift to whichever ran later."""
    # groups: a pool of exactly --requests prompts, so that --requests 5k sends `peers --by-group k`'s (its math
    # prompts are drawn afresh for each pool size, not as prefixes of a larger pool)
    prompts = builtin_prompts(prompt_set, requests_total if prompt_set == "groups" else 48)
    name = name or f"sweep-t{temperature:g}"
    data = {"modes": {m: [] for m in modes},
            "config": {"prompt_set": prompt_set, "max_tokens": max_tokens, "temperature": temperature,
                       "slo_tokens_per_s": slo, "requests_total": requests_total, "server_flags": list(server_flags),
                       "concurrencies": concurrencies, "repeats": repeats, "ignore_eos": ignore_eos}}
    servers: dict[str, Server] = {}
    try:
        for mode in modes:
            servers[mode] = Server([*MODES[mode], *server_flags])
            run_point(servers[mode], prompts, 1, 2, 8, temperature, slo)  # warm-up
        for c in concurrencies:
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(repeats):
                for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                    runs[mode].append(measure(servers[mode], prompts, c, max(2, requests_total // c), max_tokens,
                                              temperature, slo, ignore_eos))
            points = {mode: combine(runs[mode], c) for mode in modes}
            for mode, p in points.items():
                data["modes"][mode].append(p)
                tau = f"{p['tau']:.2f}" if p["tau"] else "-"
                vs = per_prompt_speedup(p, points["none"]) if mode != "none" and "none" in points else None
                print(f"{mode:>16} c={c:<3} total {p['total_tokens_per_s']:7.1f} tok/s  all users active "
                      f"{p['all_users_tokens_per_s']:7.1f}  per-user p50 "
                      f"{p['per_user_tokens_per_s']['p50']:6.1f}  ttft p50 {p['ttft_s']['p50'] * 1e3:6.0f} ms  "
                      f"tau {tau}  errors {sum(p['errors'].values())}"
                      + (f"  runs {p['runs_total_tokens_per_s']}" if repeats > 1 else "")
                      + (f"  per prompt vs none {vs['median']:.2f}x ({vs['p10']:.2f}-{vs['p90']:.2f})" if vs else ""),
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    publish(data, path, write_md)
    return data


def render(json_path: str, write_md: str | None = "docs/benchmarks.md", goodput_slo: float = 0.0) -> None:
    """Redraw the chart and table of a saved sweep (no server, no load); with goodput_slo, also the goodput."""
    data = json.loads(Path(json_path).read_text())
    if goodput_slo:
        data["config"]["goodput_slo"] = goodput_slo
        Path(json_path).write_text(json.dumps(data, indent=1))
    publish(data, Path(json_path), write_md)


def goodput(point: dict, slo: float) -> float | None:
    """Tokens/s of the requests whose own tokens/s met `slo` (DistServe's goodput, in tokens)."""
    if "requests_tps" not in point:
        return None
    good = sum(n for tps, n in zip(point["requests_tps"], point["requests_tokens"]) if tps >= slo)
    return good / point["wall_s"] if point["wall_s"] else 0.0


def publish(data: dict, json_path: Path, write_md: str | None) -> None:
    """The chart beside the sweep's JSON, and its table in the markdown report (sections named after the JSON)."""
    chart = json_path.with_suffix(".png")
    plot(data, chart)
    if write_md:
        from dspark.engine.report import replace_section

        replace_section(Path(write_md), json_path.stem, markdown(data, json_path.stem, chart.name))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for mode, points in data["modes"].items():
        xs = [p["per_user_tokens_per_s"]["p50"] for p in points]
        ys = [p["total_tokens_per_s"] for p in points]
        ax.plot(xs, ys, marker="o", label=mode, linewidth=2.5 if "adaptive" in mode else 1.2)
        for x, y, p in zip(xs, ys, points):
            ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    cfg = data["config"]
    ax.set_xlabel("per-user tokens/s (p50)")
    ax.set_ylabel("total output tokens/s")
    ax.set_title(f"{cfg['prompt_set']} prompts, temperature {cfg['temperature']:g}; labels = concurrent users")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adaptive_vs_fixed(data: dict) -> list[dict]:
    """Per concurrency: adaptive's total and per-user tokens/s over the best fixed draft length's, and over none."""
    modes = data["modes"]
    if "dspark adaptive" not in modes:
        return []
    rows = []
    for i, p in enumerate(modes["dspark adaptive"]):
        row = {"concurrency": p["concurrency"]}
        for key, names in (("fixed", [m for m in modes if m.startswith("k=")]), ("none", ["none"])):
            others = {m: modes[m][i] for m in names if m in modes and i < len(modes[m])}
            if not others:
                continue
            bt = max(others, key=lambda m: others[m]["total_tokens_per_s"])
            bu = max(others, key=lambda m: others[m]["per_user_tokens_per_s"]["p50"])
            row[key] = {"total_ratio": p["total_tokens_per_s"] / max(others[bt]["total_tokens_per_s"], 1e-9),
                        "best_total": bt, "runs_ratio": _paired(p, others[bt]),
                        "all_users_ratio": p.get("all_users_tokens_per_s", 0.0)
                        / max(others[bt].get("all_users_tokens_per_s", 0.0), 1e-9),
                        "user_ratio": p["per_user_tokens_per_s"]["p50"]
                        / max(others[bu]["per_user_tokens_per_s"]["p50"], 1e-9), "best_user": bu}
        rows.append(row)
    return rows


def per_prompt_speedup(p: dict, q: dict) -> dict | None:
    """loadgen.paired_speedup of two saved sweep points (None for points saved before requests_prompt was kept)."""
    if "requests_prompt" not in p or "requests_prompt" not in q:
        return None
    return paired_speedup(zip(p["requests_prompt"], p["requests_tps"]), zip(q["requests_prompt"], q["requests_tps"]))


def _paired(p: dict, q: dict) -> list[float]:
    """Per-run total tokens/s ratios of two modes, run i with run i (they ran back to back)."""
    a, b = p.get("runs_total_tokens_per_s", []), q.get("runs_total_tokens_per_s", [])
    return [x / y for x, y in zip(a, b) if y > 0] if len(a) > 1 else []


def markdown(data: dict, name: str, chart: str) -> str:
    cfg = data["config"]
    repeats = cfg.get("repeats", 1)
    runs = "one run" if repeats == 1 else (f"{repeats} runs per point, the modes taking turns in rotating order; "
                                           "each figure is over all of a point's runs together")
    flags = " ".join(cfg["server_flags"])
    cmd = (f"dspark loadtest sweep --modes '{','.join(data['modes'])}' --name {name} --prompts {cfg['prompt_set']}"
           f" --max-tokens {cfg['max_tokens']} --temperature "
           f"{cfg['temperature']:g} --concurrency {','.join(map(str, cfg['concurrencies']))} --requests "
           f"{cfg['requests_total']}" + (f" --repeats {repeats}" if repeats > 1 else "")
           + (f" --slo {cfg['slo_tokens_per_s']:g}" if cfg["slo_tokens_per_s"] else "")
           + ("" if cfg.get("ignore_eos", True) else " --ignore-eos off") + (f" -- {flags}" if flags else ""))
    lines = [f"<!-- bench:{name} -->", f"## Load sweep, temperature {cfg['temperature']:g}: per-user vs total tokens/s",
             "", f"Command: `{cmd}`. The real HTTP server (SSE streaming) in each mode, closed loop with N users, "
             f"{cfg['max_tokens']} tokens per request"
             + (", ignore_eos" if cfg.get("ignore_eos", True) else ", stopping at EOS")
             + f", {cfg['prompt_set']} prompts; {runs}. "
             "tau and the scheduler's share of step time are read from the server's /metrics for each point. "
             "'All users active': tokens/s until the first user was done, i.e. without the drain at the end, where "
             "the last users run at a lower concurrency than the point's.",
             "", f"![sweep]({chart})", "",
             "| mode | users | total tok/s | all users active tok/s | per-user tok/s p50 / p90 | TTFT p50 ms | "
             "TPOT p50 ms | tau | draft/round | scheduler share | errors |", "|---" * 11 + "|"]
    for mode, points in data["modes"].items():
        for p in points:
            u = p["per_user_tokens_per_s"]
            tau = f"{p['tau']:.2f}" if p["tau"] else "-"
            dpr = f"{p['draft_per_round']:.2f}" if p["draft_per_round"] else "-"
            share = f"{100 * p['scheduler_share']:.2f}%" if p["scheduler_share"] is not None else "-"
            active = f"{p['all_users_tokens_per_s']:.1f}" if "all_users_tokens_per_s" in p else "-"
            lines.append(f"| {mode} | {p['concurrency']} | {p['total_tokens_per_s']:.1f} | {active} | {u['p50']:.1f} / "
                         f"{u['p90']:.1f} | {p['ttft_s']['p50'] * 1e3:.0f} | {p['tpot_s']['p50'] * 1e3:.1f} | {tau} | "
                         f"{dpr} | {share} | {sum(p['errors'].values())} |")
    base = data["modes"].get("none", [])
    rows = [(mode, p, per_prompt_speedup(p, base[i]) if i < len(base) else None)
            for mode, points in data["modes"].items() if mode != "none" for i, p in enumerate(points)]
    if any(vs or p.get("proposers") for _, p, vs in rows):
        lines += ["", "Per prompt against none (each prompt's tok/s over none's on the same prompt, then the median "
                  "and p10-p90 over prompts: `loadgen.paired_speedup`), and the verified rounds by proposer (share "
                  "of rounds, tau, draft tokens per round), from the server's counters:", "",
                  "| mode | users | per-user vs none, per prompt: median (p10-p90) | rounds by proposer |",
                  "|---|---|---|---|"]
        for mode, p, vs in rows:
            props = "; ".join(f"{d}: {100 * x['rounds_share']:.0f}%, tau {x['tau']:.2f}, {x['draft_per_round']:.1f}"
                              for d, x in sorted(p.get("proposers", {}).items()))
            cell = f"{vs['median']:.2f}x ({vs['p10']:.2f}-{vs['p90']:.2f}, {vs['prompts']} prompts)" if vs else "-"
            lines.append(f"| {mode} | {p['concurrency']} | {cell} | {props or '-'} |")
    slo = cfg.get("goodput_slo")
    if slo:
        modes = list(data["modes"])
        lines += ["", f"Goodput at a per-user SLO of {slo:g} tok/s (tokens/s of the requests that met it; the SLO "
                  "chosen from the curve above, rendered with `dspark loadtest sweep --render docs/"
                  f"{name}.json --goodput-slo {slo:g}`):", "",
                  "| users | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for i, c in enumerate(cfg["concurrencies"]):
            cells = []
            for m in modes:
                g = goodput(data["modes"][m][i], slo) if i < len(data["modes"][m]) else None
                cells.append("-" if g is None else f"{g:.1f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    rows = adaptive_vs_fixed(data)
    if rows:
        def cell(r, key, what):
            c = r.get(key)
            return f"{c[what + '_ratio']:.2f} ({c.get('best_' + what, c['best_total'])})" if c else "-"

        def spread(r):
            ratios = r.get("none", {}).get("runs_ratio")
            return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"

        lines += ["", "Adaptive at the same concurrency, same run: ratio to the best fixed draft length (which one), "
                  "and to no speculation" + (" (with the range of the per-run ratios, run i against run i)"
                                             if repeats > 1 else "") + ":", "",
                  "| users | total tok/s vs best fixed k | per-user p50 vs best fixed k | total vs none | "
                  "all users active vs none | per-user p50 vs none |"
                  + (" per-run total vs none |" if repeats > 1 else ""),
                  "|---|---|---|---|---|---|" + ("---|" if repeats > 1 else "")]
        lines += [f"| {r['concurrency']} | {cell(r, 'fixed', 'total')} | {cell(r, 'fixed', 'user')} | "
                  f"{cell(r, 'none', 'total').split(' ')[0]} | {cell(r, 'none', 'all_users').split(' ')[0]} | "
                  f"{cell(r, 'none', 'user').split(' ')[0]} |" + (f" {spread(r)} |" if repeats > 1 else "")
                  for r in rows]
    lines += ["", f"<!-- /bench:{name} -->"]
    return "\n".join(lines)
