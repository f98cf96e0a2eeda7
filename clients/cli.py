"""`emo-client`: a small command over `clients.Client`.

    emo-client complete "def fib(n):" --profile python --max-tokens 64 --stream
    emo-client profiles
    emo-client models
    emo-client health

Global options (before or after the sub-command): --base-url (env
EMO_BASE_URL), --api-key (env EMO_API_KEY), --timeout, --max-retries. On an
error the server's message goes to stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from .client import DEFAULT_BASE_URL, Client
from .errors import EmoError


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--base-url",
        default=default(os.environ.get("EMO_BASE_URL", DEFAULT_BASE_URL)),
        help="server root, with or without /v1 (env EMO_BASE_URL; default %(default)s)"
        if not suppress else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("EMO_API_KEY")),
        help="API key, sent as a Bearer token (env EMO_API_KEY; default: none)" if not suppress else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--timeout", type=float, default=default(300.0),
        help="seconds to wait for an answer (default %(default)s)" if not suppress else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--max-retries", type=int, default=default(2),
        help="retries on 429/503 and failed connections (default %(default)s)"
        if not suppress else argparse.SUPPRESS,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-client",
        description="Talk to an emo-serve server (completions, profiles, models).",
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("complete", parents=[common], help="POST /v1/completions")
    c.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or nothing reads stdin")
    c.add_argument("--profile", help="domain profile: a profile name, 'full' or 'auto' (default: the server's, "
                   "full)")
    c.add_argument("--model", help="model name (default: the server's base model)")
    c.add_argument("--profile-in-model", action="store_true",
                   help="send the profile as model '<base>:<profile>' (behind a router; default: as the "
                        "profile field)")
    c.add_argument("--stream", action="store_true", help="print text as it is generated (default: at the end)")
    c.add_argument("--max-tokens", type=int, help="tokens to generate (default: the server's, 16)")
    c.add_argument("--temperature", type=float, help="sampling temperature, 0 for greedy (default: the "
                   "server's, 1)")
    c.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the server's, 1)")
    c.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: the server's, off)")
    c.add_argument("--seed", type=int, help="seed for reproducible sampling (default: none)")
    c.add_argument("--stop", action="append", help="stop sequence, repeatable (default: none)")
    c.add_argument("--n", type=int, help="completions per prompt (default: the server's, 1)")
    c.add_argument("--logprobs", type=int, help="return this many top logprobs per token (default: none)")
    c.add_argument("--echo", action="store_true", default=None, help="prepend the prompt to the text "
                   "(default: off)")
    c.add_argument("--json", action="store_true", help="print the whole response as JSON (default: the text)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print the serving profile, finish reason and usage to stderr (default: off)")

    for name, what in (("profiles", "GET /v1/profiles"), ("models", "GET /v1/models"), ("health", "GET /health")):
        q = sub.add_parser(name, parents=[common], help=what)
        q.add_argument("--json", action="store_true", help="print the response as JSON (default: a table)")
    return parser


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _experts(value: Any) -> str:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        if value and all(v == value[0] for v in value):
            return f"{value[0]}x{len(value)}"
        return str(sum(value))
    return "-" if value is None else str(value)


def _coverage(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_complete(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, n=args.n,
        logprobs=args.logprobs, echo=args.echo,
    )
    if args.stream:
        stream = client.complete(prompt, profile=args.profile, model=args.model, stream=True, **sampling)
        with stream:
            if args.json:
                for chunk in stream.iter_chunks():
                    print(chunk.model_dump_json(), flush=True)
            else:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        if args.verbose:
            print(f"[profile={stream.profile} finish_reason={stream.finish_reason}"
                  f" usage={stream.usage.model_dump() if stream.usage else None}]", file=sys.stderr)
        return 0
    out = client.complete(prompt, profile=args.profile, model=args.model, **sampling)
    if args.json:
        print(out.model_dump_json(indent=2))
    else:
        for i, choice in enumerate(out.choices):
            if i:
                print("---")
            print(choice.text)
    if args.verbose:
        reasons = [c.finish_reason for c in out.choices]
        print(f"[profile={out.profile} finish_reason={','.join(map(str, reasons))}"
              f" usage={out.usage.model_dump() if out.usage else None}]", file=sys.stderr)
    return 0


def _cmd_profiles(client: Client, args: argparse.Namespace) -> int:
    profiles = client.profiles()
    if args.json:
        print(json.dumps([p.model_dump() for p in profiles], indent=2))
        return 0
    rows = [("NAME", "EXPERTS/LAYER", "EXPERT BYTES", "COVERAGE", "RESIDENT")]
    for p in profiles:
        resident = "-" if p.resident is None else ("yes" if p.resident else "no")
        rows.append((p.name, _experts(p.experts_per_layer), _human_bytes(p.expert_bytes),
                     _coverage(p.average_coverage), resident))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _cmd_models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
    else:
        for m in models:
            print(m.id)
    return 0


def _cmd_health(client: Client, args: argparse.Namespace) -> int:
    health = client.health()
    print(health.model_dump_json(indent=2) if args.json else health.status)
    return 0 if health.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "complete": _cmd_complete,
        "profiles": _cmd_profiles,
        "models": _cmd_models,
        "health": _cmd_health,
    }
    try:
        profile_in_model = getattr(args, "profile_in_model", False)
        with Client(
            args.base_url,
            api_key=args.api_key,
            timeout=args.timeout,
            max_retries=args.max_retries,
            profile_in_model=profile_in_model,
        ) as client:
            return commands[args.command](client, args)
    except EmoError as exc:
        print(f"emo-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `emo-client ... | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
