"""The `dspark` command (also `python -m dspark`): serve, train-target, train-drafter, eval-drafter, bench, loadtest."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dspark.engine.settings import DEFAULT_MODEL, Settings, load_settings


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field (--max-num-seqs ...), so the CLI never drifts from the settings model."""
    p.add_argument("--config", help="YAML settings file (default configs/default.yaml)")
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        typ = int if ann in (int, int | None) else float if ann in (float, float | None) else str
        flags = [f"--{name.replace('_', '-')}", *(["-tp"] if name == "tensor_parallel_size" else [])]
        p.add_argument(*flags, dest=name, type=typ, default=None, help=field.description)


def _settings(args) -> Settings:
    overrides = {k: getattr(args, k) for k in Settings.model_fields}
    return load_settings(args.config, **overrides)


def cmd_serve(args) -> None:
    from dspark.logs import setup_logging

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format)
    if settings.api_server_count > 1:  # a launcher: the core and N API server processes (nothing of the app here)
        from dspark.server.api_servers import run_api_servers

        sys.exit(run_api_servers(settings))
    from dspark.server.app import create_app
    from dspark.server.async_llm import AsyncLLM
    from dspark.server.drain import serve

    engine = AsyncLLM.from_settings(settings)
    sys.exit(serve(create_app(engine, settings), settings))


def cmd_train_target(args) -> None:
    from dspark.engine.training.train_target import train_target

    shape = {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads") if getattr(args, k)}
    train_target(args.out, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
                 threads=args.threads, tokenizer_from=args.tokenizer_from, shape=shape)


def cmd_train_drafter(args) -> None:
    from dspark.engine.training.train_drafter import train_drafter

    target = Settings(model=args.model)
    out = args.out or str(target.drafters_dir / args.method)
    if args.recipe:
        from dspark.engine.training.recipe import train_recipe

        print(train_recipe(target.model, args.recipe, args.method, out, stop_after=args.stop_after,
                           device=args.device, threads=args.threads))
        return
    print(train_drafter(target.model, out, method=args.method, steps=args.steps, batch=args.batch,
                        block_size=args.block_size, num_layers=args.num_layers, markov_rank=args.markov_rank,
                        lr=args.lr, seed=args.seed, num_prompts=args.num_prompts, max_new=args.max_new_tokens,
                        device=args.device, intermediate_size=args.intermediate_size,
                        markov_factored=args.markov_factored, taps=args.taps, anchors=args.anchors,
                        gen_limit=args.gen_limit, init_from=args.init_from, threads=args.threads,
                        stop_after=args.stop_after,
                        draft_vocab_size=args.draft_vocab_size))


def _loadtest_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="mixed", help="code | math | chat | mixed | heldout (real held-out prompts), "
                   "groups (`peers --by-group`'s five groups, in turn), or a .jsonl file")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo", type=float, default=0.0, help="per-request tokens/s target sent as slo_tokens_per_s")


def cmd_loadtest_run(args) -> None:
    import asyncio
    import json

    import httpx

    from dspark.loadtest.loadgen import LoadConfig, builtin_prompts, closed_loop, file_prompts, open_loop, save_results
    from dspark.loadtest.loadgen import summarize as summarize_load

    prompts = file_prompts(args.prompts) if args.prompts.endswith(".jsonl") else builtin_prompts(args.prompts, 48)
    key = args.api_key or os.environ.get("DSPARK_API_KEY")
    cfg = LoadConfig(args.url, "", prompts, args.max_tokens, args.temperature, args.slo, api_key=key)
    cfg.model = httpx.get(args.url + "/v1/models", headers=cfg.headers()).json()["data"][0]["id"]
    if args.rate:
        results, wall = asyncio.run(open_loop(cfg, args.rate, args.requests))
    else:
        results, wall = asyncio.run(closed_loop(cfg, args.users, max(1, args.requests // args.users)))
    summary = summarize_load(results, wall)
    save_results(Path(args.out), summary, results)
    print(json.dumps(summary, indent=1))


def cmd_loadtest_sweep(args) -> None:
    from dspark.loadtest.sweep import render, sweep

    if args.render:
        return render(args.render, args.write or None, args.goodput_slo)
    if args.prompts.endswith(".jsonl"):
        raise SystemExit("sweep uses the built-in prompt sets (code, math, chat, mixed, heldout, groups)")
    sweep([m.strip() for m in args.modes.split(",")], [int(c) for c in args.concurrency.split(",")],
          args.prompts, args.max_tokens, args.temperature, args.slo, args.requests, args.server_flags,
          args.out_dir, name=args.name, write_md=args.write or None, repeats=args.repeats,
          ignore_eos=args.ignore_eos == "on")


def cmd_loadtest_soak(args) -> None:
    import json

    from dspark.loadtest.soak import run_soak

    report = run_soak(args.url, args.seconds, args.users, args.pid)
    print(json.dumps(report, indent=1))
    if report["problems"] or report["drained"]["kv_free"] != report["drained"]["kv_total"]:
        raise SystemExit(1)


def cmd_eval_drafter(args) -> None:
    from dspark.engine.drafters import DrafterConfig
    from dspark.engine.training.eval_drafter import evaluate

    # a drafter directory names its own method (--methods would otherwise pair it with the others' names)
    methods = [DrafterConfig.load(Path(args.drafter)).method] if args.drafter else args.methods.split(",")
    evaluate(Settings(model=args.model).model, methods, per_group=args.per_group,
             max_tokens=args.max_tokens, write=args.write, thresholds=tuple(map(float, args.thresholds.split(","))),
             save_calibration=not args.no_calibration, drafter=args.drafter)


def cmd_bench(args) -> None:
    from dspark.loadtest.bench import bench_speculative, run_bench

    if args.sps:
        from dspark.loadtest.sps import QWEN3_8B, TINY, sps_curve, write_sps

        settings = _settings(args)
        shape = QWEN3_8B if args.sps == "qwen3-8b" else TINY
        graphs = settings.graphs_on
        rows = sps_curve(shape, settings.device, settings.attention, args.sps_context, args.sps_draft,
                         graphs=graphs)
        if args.write:
            cmd = (f"dspark bench --sps {args.sps} --device {settings.device} --attention-backend "
                   f"{settings.attention} --cuda-graphs {'on' if graphs else 'off'} --sps-context "
                   f"{args.sps_context} --sps-draft {args.sps_draft}")
            write_sps(args.write, rows, cmd, settings.device, settings.attention, args.sps_context,
                      args.sps_draft, graphs)
        return
    if args.speculative_methods:
        bench_speculative(_settings(args), args.speculative_methods.split(","), tokens=args.tokens, write=args.write,
                          per_group=args.per_group, hf=args.hf)
        return
    run_bench(_settings(args), tokens=args.tokens, concurrency=args.concurrency, write=args.write,
              hf=not args.no_hf)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dspark", description="OpenAI-compatible LLM server with DSpark")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="serve a model (default: SmolLM2-135M-Instruct) on 127.0.0.1:8000")
    _add_settings_flags(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("train-target", help="retrain the tiny test model (models/tiny-qwen3-5m) and its tokenizer")
    p.add_argument("--out", default="models/tiny-qwen3-5m")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer-from", default=None, help="reuse this model's tokenizer (for a draft model)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the default shape")
    p.set_defaults(fn=cmd_train_target)

    p = sub.add_parser("train-drafter", help="train a dspark / dflash drafter for a target (resumes if stopped)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model (HF directory, GGUF file or known name)")
    p.add_argument("--method", default="dspark", choices=["dspark", "dflash", "eagle3"])
    p.add_argument("--recipe", default=None, help="a configs/drafters/*.yaml file: run all its phases for --method "
                   "(its shape, data and steps; other flags but --out, --device, --threads, --stop-after ignored)")
    p.add_argument("--out", default=None, help="default: the model's drafters directory/<method>")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--markov-rank", type=int, default=None, help="default min(256, hidden)")
    p.add_argument("--markov-factored", action="store_true",
                   help="Markov head through the target's embedding and LM head (2*d*rank weights, not 2*vocab*rank)")
    p.add_argument("--intermediate-size", type=int, default=0, help="drafter MLP width; 0 = the target's")
    p.add_argument("--taps", type=int, default=5, help="target layers whose hidden states feed the drafter")
    p.add_argument("--anchors", type=int, default=16, help="blocks trained per sequence per step")
    p.add_argument("--gen-limit", type=int, default=None,
                   help="answer only the first N of the --num-prompts draw (a shorter generation, same recipe)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=1536)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; the same code runs on both")
    p.add_argument("--init-from", default=None,
                   help="continue from this saved drafter (same shape), with a fresh optimizer and schedule")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this many steps (the next run resumes); 1 prepares the data only")
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="train over the target's this many most frequent answer tokens, what serving's "
                   "--draft-vocab-size drafts from (several times faster steps); 0 = the whole vocabulary")
    p.set_defaults(fn=cmd_train_drafter)

    p = sub.add_parser("eval-drafter", help="acceptance benchmark of drafters on held-out code / math / chat")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", default="dspark,dflash")
    p.add_argument("--per-group", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--no-calibration", action="store_true", help="do not write fitted confidence temperatures")
    p.add_argument("--thresholds", default="0.5,0.6,0.7,0.8", help="confidence cuts to sweep (dspark)")
    p.add_argument("--drafter", default=None, help="evaluate this drafter directory (one method) instead")
    p.add_argument("--write", default="docs/benchmarks.md")
    p.set_defaults(fn=cmd_eval_drafter)

    p = sub.add_parser("bench", help="generated tokens/s at batch 1 and N concurrent, vs HF transformers")
    _add_settings_flags(p)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--speculative-methods", dest="speculative_methods", default=None,
                   help="e.g. none,dflash,dspark: per-user tokens/s at batch 1 per method instead")
    p.add_argument("--hf", action="store_true",
                   help="with --speculative-methods: also time HF generate(), plain and with prompt lookup")
    p.add_argument("--per-group", type=int, default=8, help="with --speculative-methods: prompts per group")
    p.add_argument("--sps", choices=["qwen3-8b", "tiny"], default=None,
                   help="time verification steps vs batch tokens against the bandwidth floor (random weights)")
    p.add_argument("--sps-context", type=int, default=1024, help="--sps: KV tokens per request")
    p.add_argument("--sps-draft", type=int, default=3, help="--sps: draft tokens verified per request")
    p.add_argument("--write", default="docs/benchmarks.md", help="markdown file to update ('' to skip)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("loadtest", help="HTTP load test against a running server, or a sweep over modes")
    lsub = p.add_subparsers(dest="loadtest_cmd", required=True)
    q = lsub.add_parser("run", help="closed loop (--users) or open loop (--rate) against --url")
    q.add_argument("--url", default="http://127.0.0.1:8000")
    q.add_argument("--users", type=int, default=8, help="closed loop: concurrent users")
    q.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second instead")
    q.add_argument("--requests", type=int, default=64, help="total requests")
    _loadtest_flags(q)
    q.add_argument("--api-key", help="sent as Authorization: Bearer <key> (default: $DSPARK_API_KEY)")
    q.add_argument("--out", default="runs/loadtest.json")
    q.set_defaults(fn=cmd_loadtest_run)
    q = lsub.add_parser("sweep", help="start the server per mode and sweep concurrencies; chart + table to docs/")
    q.add_argument("--modes", default="none,k=1,k=4,k=7,dspark adaptive",
                   help="comma-separated, of: none, k=1, k=4, k=7, dspark adaptive, ngram, dspark+ngram, default "
                   "(the configured defaults)")
    q.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    q.add_argument("--requests", type=int, default=32, help="requests per point (at least 2 per user)")
    q.add_argument("--repeats", type=int, default=1,
                   help="runs per point; the modes take turns in rotating order (a noisy machine's drift cancels)")
    q.add_argument("--ignore-eos", choices=["on", "off"], default="on",
                   help="on: every request runs max_tokens (a fixed load); off: requests stop at EOS, as "
                   "`peers --by-group` runs them")
    _loadtest_flags(q)
    q.add_argument("--out-dir", default="docs")
    q.add_argument("--name", default=None, help="JSON file stem and report section (default: sweep-t<temperature>)")
    q.add_argument("--write", default="docs/benchmarks.md", help="markdown file to update ('' to skip)")
    q.add_argument("--render", default=None, help="only redraw chart and table from this saved sweep JSON")
    q.add_argument("--goodput-slo", type=float, default=0.0,
                   help="with --render: add goodput (tokens/s of requests meeting this per-user tok/s)")
    q.add_argument("server_flags", nargs="*", help="after --: extra flags for every server")
    q.set_defaults(fn=cmd_loadtest_sweep)

    # its flags are dspark/loadtest/peers.py's own parser's: main() hands it everything after "loadtest peers"
    lsub.add_parser("peers", help="this server beside llama.cpp and transformers serve, same prompts (--help)")

    # likewise dspark/loadtest/routing.py's parser
    lsub.add_parser("routing", help="2 replicas behind nginx, multi-turn ShareGPT replay: round-robin vs consistent "
                    "hashing on a session header (--help)")

    q = lsub.add_parser("soak", help="time-bounded mix of good, bad, dropped and cancelled requests; checks leaks")
    q.add_argument("--url", default="http://127.0.0.1:8000")
    q.add_argument("--seconds", type=float, default=600)
    q.add_argument("--users", type=int, default=16)
    q.add_argument("--pid", type=int, default=None, help="server process id, to compare its RSS before and after")
    q.set_defaults(fn=cmd_loadtest_soak)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["loadtest", "peers"]:
        import shlex

        from dspark.loadtest.peers import main as peers_main

        peers_main(argv[2:], "dspark loadtest peers " + shlex.join(argv[2:]))
        return
    if argv[:2] == ["loadtest", "routing"]:
        from dspark.loadtest.routing import main as routing_main

        routing_main(argv[2:])
        return
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
