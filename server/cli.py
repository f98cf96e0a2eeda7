"""`emo-serve`: an OpenAI-compatible completion server where each request picks its
domain profile (docs/http-api.md in the repository)."""

from __future__ import annotations

import time

_T0 = time.monotonic()  # process start, as near as Python lets us see it

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from .tool_parsers import FORMATS  # noqa: E402  (stdlib only: --help stays fast)

log = logging.getLogger("emo_serve")


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}  # Kubernetes' spelling too, as deploy/ uses


def parse_size(text: str) -> int:
    """'6GiB', '512MB', '1e9' or '0' -> bytes (an argparse type: a bad value is a usage error)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number of bytes, or with a unit: 512MB, 6GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def openmp_wait_default() -> str:
    """Let idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose.

    libgomp's default keeps a thread that reached the end of a parallel region
    spinning for its peers. When another process shares the cores, the peer it
    waits for is often descheduled and the spinning burns the very CPU that
    peer needs: next to a busy neighbour, 2-thread decode fell 4.9x (PASSIVE:
    1.7x; benchmarks/bench_threads.py, docs/http-api.md). On
    idle cores sleeping costs a futex wake per region, a few percent on a real
    model. OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins."""
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if var in os.environ:
            return f"{var}={os.environ[var]} (environment)"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "passive (default; OMP_WAIT_POLICY overrides)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emo-serve", description=__doc__)
    p.add_argument("--model", help="checkpoint folder or Hugging Face repo id (default: the bundled demo model "
                                    "with its bundled profiles; with only --profile: the first profile's weights)")
    p.add_argument("--profile", action="append", default=[], metavar="DIR|NAME=EXPERTS.json",
                   help="a profile folder written by emo-subset, or NAME=file.json with {layer: [original expert ids]} "
                        "over a full --model (repeatable; default: none, or the bundled demo's profiles without "
                        "--model)")
    p.add_argument("--profiles-dir", action="append", default=[], metavar="DIR",
                   help="serve every subfolder with a profile.json (repeatable; a symlink that leads outside DIR "
                        "is refused; default: none)")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (repeatable; also "
                        "EMO_SERVE_API_KEYS, comma-separated; an empty key is an error; default: none, "
                        "with a warning when --host is not this machine)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (default: /metrics needs the key when keys are set)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots; default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting; beyond it requests get 429 (default 256)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's; a larger value is capped "
                                                      "to the model's)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens admitted per engine step (default 2048)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request is aborted with 504 (default 600; 0: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM/SIGINT: seconds running requests may still finish; then they end with a 503 "
                        "error (streams: an error event) (default 5)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt; default 16)")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / top_logprobs (default 20)")
    p.add_argument("--max-request-logprobs", type=int, default=1 << 18,
                   help="logprob values one request may ask for: sequences x tokens x (1 + logprobs) "
                        "(default 262144: about 18 MB of JSON)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's; another one copies)")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for every matrix but the router, made "
                   "lazily as experts are first used: about half the bytes per token, not bit-exact (default: off)")
    p.add_argument("--compile", action="store_true", help="on the pure-torch kernel path only (EMO_CPU_ISA=torch, "
                   "or no native kernels built): single-sequence decode through a TorchInductor-compiled "
                   "bf16 GEMV, and for MXFP4 experts (gpt-oss) a fused loop over their 4-bit bytes; the first "
                   "request per matrix shape compiles (seconds); the native kernels are faster (default: off)")
    p.add_argument("--auto-rule", default="fit", choices=["fit", "affinity", "centroid", "perplexity"],
                   help="how profile 'auto' picks a hosted profile for a prompt: the most router mass inside its "
                        "pool relative to the share it holds of its own calibration text (fit), the most router "
                        "mass inside its pool (affinity), the nearest centroid fingerprint, or the least prompt "
                        "perplexity (one forward per profile); measured side by side in reports/subset "
                        "(default %(default)s)")
    p.add_argument("--auto-min-fit", type=float, default=0.0, metavar="X",
                   help="profile 'auto' serves 'full' when no hosted profile's fit reaches X (about 1 for text "
                        "like a profile's calibration text; /v1/routing reports every fit and the margin) "
                        "(default %(default)s: never fall back)")
    p.add_argument("--no-expert-metrics", dest="expert_metrics", action="store_false",
                   help="no per-layer expert-load counters at /metrics (layers x experts series; for very large "
                        "models) (default: on)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs this process may use: its "
                   "affinity mask and cgroup CPU quota; OMP_NUM_THREADS, when set, wins)")
    p.add_argument("--mlock", action="store_true",
                   help="lock in memory the base weights and the experts the hosted profiles use, so page-cache "
                        "pressure cannot evict them (pre-faults them instead where locking is not allowed; "
                        "quantized matrices are locked as stored for the native kernels, repacked at start on the torch path; "
                        "default: off)")
    p.add_argument("--verify", action="store_true",
                   help="check every profile's files against the sha256 recorded in its profile.json before "
                        "serving (/health answers only after); a profile that fails is out of service "
                        "(default: the same check in the background after start)")
    p.add_argument("--reverify-interval", type=float, default=0.0, metavar="SECONDS",
                   help="re-hash the served profile files every SECONDS in the background, at the lowest CPU "
                        "priority (a profile whose bytes changed leaves service); catches what leases cannot see, "
                        "such as a flipped bit on disk (default: 0, checked once after start)")
    p.add_argument("--no-file-leases", dest="file_leases", action="store_false",
                   help="take no read leases on the mapped files; then truncating or rewriting a served file crashes "
                        "the server (SIGBUS) (default: leases on, where the filesystem and ownership allow)")
    p.add_argument("--mxfp4-cache", type=parse_size, default=0, metavar="SIZE",
                   help="keep up to SIZE (e.g. 6GiB, 512MB) of dequantized MXFP4 experts (gpt-oss), least recently "
                        "used out: decode stops dequantizing the experts a stream keeps choosing, at the cost of "
                        "their bf16 bytes; a profile's bf16 expert size keeps all of them (default: 0, every use "
                        "dequantizes and memory holds only the 4-bit bytes). With the native kernels MXFP4 is multiplied "
                        "as stored and a cache only moves those experts back to the torch path")
    p.add_argument("--tool-call-parser", choices=sorted(FORMATS),
                   help="how the model writes tool calls (default: read from its chat template; hermes when the "
                        "template says nothing)")
    p.add_argument("--reasoning-parser", choices=["think", "none"],
                   help="split <think>...</think> out of the content into reasoning_content (default: when the "
                        "chat template mentions <think>)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log detail (default info: start-up summary and one access line per request)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, keys: list[str]) -> None:
    """Exit with a message naming the option for a value the server cannot run with."""
    for name, v in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue), ("--max-n", args.max_n),
                    ("--max-body-bytes", args.max_body_bytes), ("--max-prefill-tokens", args.max_prefill_tokens),
                    ("--max-request-logprobs", args.max_request_logprobs)):
        if v < 1:
            sys.exit(f"emo-serve: {name} must be at least 1 (got {v})")
    if args.max_model_len is not None and args.max_model_len < 2:
        sys.exit(f"emo-serve: --max-model-len must be at least 2 tokens (got {args.max_model_len})")
    if args.threads is not None and args.threads < 1:
        sys.exit(f"emo-serve: --threads must be at least 1 (got {args.threads})")
    if args.max_logprobs < 0:
        sys.exit(f"emo-serve: --max-logprobs must be at least 0 (got {args.max_logprobs})")
    if not args.request_timeout >= 0:  # also NaN
        sys.exit(f"emo-serve: --request-timeout must be a number of seconds >= 0 (0: no limit); got "
                 f"{args.request_timeout}")
    if not args.reverify_interval >= 0:
        sys.exit(f"emo-serve: --reverify-interval must be a number of seconds >= 0 (0: never); got "
                 f"{args.reverify_interval}")
    if not args.shutdown_timeout >= 0:
        sys.exit(f"emo-serve: --shutdown-timeout must be a number of seconds >= 0; got {args.shutdown_timeout}")
    if not 0 <= args.port <= 65535:
        sys.exit(f"emo-serve: --port must be in 0..65535 (got {args.port})")
    if any(not k.strip() for k in keys):
        sys.exit("emo-serve: --api-key is empty (was the variable unset?); an empty key would turn "
                 "authentication off for requests without a key. Give a key, or leave --api-key out.")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound before the model loads: a taken port fails at
    once, never after 'ready'."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sys.exit(f"emo-serve: cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def startup_summary(state, threads: str, capped_from: int | None, url: str) -> list[str]:
    reg, eng, model = state.registry, state.engine, state.registry.model
    from modeling.kernels import describe as kernels_line

    lines = [f"model {reg.base_name} ({model.config.model_type}) from {model.path}",
             f"device {model.device}, dtype {str(model.dtype).replace('torch.', '')}, "
             f"{'int8 weights' if model.quantize else 'exact weights'}, {threads}",
             kernels_line(),
             f"context {eng.max_model_len} tokens" + (f" (--max-model-len {capped_from} capped to the model's "
                                                      f"limit)" if capped_from else "")
             + f", batch {eng.max_batch}, queue {eng.max_queue}"]
    cache = model.transformer.mxfp4_cache
    if cache is not None:
        lines.append(f"MXFP4 dequantized-expert cache up to {cache.max_bytes / 2**30:.2f} GiB" if
                     model.config.extra.get("mxfp4") else "--mxfp4-cache ignored: the model has no MXFP4 experts")
    d = reg.describe(with_residency=False)
    for p in d["data"]:
        per = sorted(set(p["experts_per_layer"].values()))
        per_s = "/".join(str(x) for x in per)
        lines.append(f"profile {p['name']}: {per_s} experts per MoE layer ({p['experts_total']} in all), "
                     f"{p['bytes']['experts'] / 2**20:.1f} MiB of experts + {p['bytes']['non_expert'] / 2**20:.1f} "
                     f"MiB shared")
    auth = f"{len(state.api_keys)} API key(s)" if state.api_keys else "no API key"
    lines.append(f"listening on {url} ({auth}; /health open, /metrics "
                 f"{'open' if state.config.public_metrics or not state.api_keys else 'behind the key'})")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.security import PrintableFormatter

    for h in logging.getLogger().handlers:  # a client's text never starts a log line of its own
        h.setFormatter(PrintableFormatter(h.formatter._fmt if h.formatter else None))
    keys = list(args.api_key) + [k.strip() for k in os.environ.get("EMO_SERVE_API_KEYS", "").split(",") if k.strip()]
    check_args(args, keys)
    sock = bind_socket(args.host, args.port)
    wait = openmp_wait_default()  # before torch loads the OpenMP runtime, which reads it once

    import torch
    import uvicorn

    from modeling.threads import cpu_budget

    from .app import build_state, context_length, create_app
    from .config import ServerConfig
    from .registry import StartupError

    budget = cpu_budget()
    if args.threads:
        torch.set_num_threads(args.threads)
        threads = f"{args.threads} threads (--threads; {budget.describe()})"
    elif "OMP_NUM_THREADS" in os.environ:
        threads = f"{torch.get_num_threads()} threads (OMP_NUM_THREADS)"
    else:
        torch.set_num_threads(budget.threads)
        threads = f"{budget.threads} threads ({budget.describe()})"
    threads += f", OpenMP wait {wait}"
    cfg = ServerConfig(model=args.model, profiles=args.profile, profiles_dirs=args.profiles_dir,
                       served_model_name=args.served_model_name, host=args.host, port=args.port, api_keys=keys,
                       max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                       max_prefill_tokens=args.max_prefill_tokens, device=args.device, dtype=args.dtype,
                       quantize=args.quantize, compile=args.compile, mxfp4_cache_bytes=args.mxfp4_cache,
                       max_body_bytes=args.max_body_bytes, max_n=args.max_n, max_logprobs=args.max_logprobs,
                       max_request_logprobs=args.max_request_logprobs, public_metrics=args.public_metrics,
                       shutdown_timeout=args.shutdown_timeout, verify=args.verify,
                       reverify_interval=args.reverify_interval, file_leases=args.file_leases,
                       request_timeout=args.request_timeout, log_level=args.log_level, auto_rule=args.auto_rule,
                       auto_min_fit=args.auto_min_fit,
                       expert_metrics=args.expert_metrics, tool_call_parser=args.tool_call_parser,
                       reasoning_parser=args.reasoning_parser)
    from modeling.kernels import IsaError, selected

    try:
        selected()  # EMO_CPU_ISA: a path this machine cannot run is a usage error, named before anything loads
        state = build_state(cfg, t0=_T0)
    except (StartupError, IsaError) as e:
        sys.exit(f"emo-serve: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        log.warning("binding %s without --api-key: anyone who reaches it can use it", args.host)
    if args.mlock:
        reg = state.registry
        pinned = reg.model.pin(reg.union_pool() if reg.profiles else None)
        log.info("--mlock: %s of %.2f GiB (%d quantized matrices repacked)%s", pinned["method"],
                 pinned["bytes"] / 1024**3, pinned["repacked_matrices"],
                 f"; {pinned['error']}" if "error" in pinned else "")
    _, capped = context_length(cfg, state.registry.model.config.max_position_embeddings)
    if capped:
        log.warning("--max-model-len %d is more than the model's limit (%d): capped to %d", args.max_model_len,
                    state.registry.model.config.max_position_embeddings, state.engine.max_model_len)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    for line in startup_summary(state, threads, args.max_model_len if capped else None, url):
        log.info("%s", line)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: streams end with an error event, not cut
            state.engine.begin_shutdown(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state), log_level=args.log_level, access_log=False, server_header=False,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = Server(config)
    log.info("ready in %.2f s", time.monotonic() - _T0)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
