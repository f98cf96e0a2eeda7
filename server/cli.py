"""`emo-serve`: an OpenAI-compatible completion server where each request picks its
domain profile (docs/http-api.md in the repository)."""

from __future__ import annotations

import time

_T0 = time.monotonic()  # process start, as near as Python lets us see it

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emo-serve", description=__doc__)
    p.add_argument("--model", help="checkpoint folder or Hugging Face repo id (default: the bundled demo model "
                                    "with its bundled profiles; with only --profile: the first profile's weights)")
    p.add_argument("--profile", action="append", default=[], metavar="DIR|NAME=EXPERTS.json",
                   help="a profile folder written by emo-subset, or NAME=file.json with {layer: [original expert ids]} "
                        "over a full --model (repeatable)")
    p.add_argument("--profiles-dir", action="append", default=[], metavar="DIR",
                   help="serve every subfolder with a profile.json (repeatable)")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also EMO_SERVE_API_KEYS, comma-separated)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting; beyond it requests get 429")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens admitted per engine step")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (504)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's; another one copies)")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for every matrix but the router, made "
                   "lazily as experts are first used: about half the bytes per token, not bit-exact (default: off)")
    p.add_argument("--compile", action="store_true", help="single-sequence decode through a TorchInductor-compiled "
                   "bf16 GEMV (faster decode; the first request per matrix shape compiles, seconds)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core allowed)")
    p.add_argument("--mlock", action="store_true",
                   help="lock in memory the base weights and the experts the hosted profiles use, so page-cache "
                        "pressure cannot evict them (pre-faults them instead where locking is not allowed; "
                        "quantized matrices are repacked at start)")
    p.add_argument("--verify", action="store_true",
                   help="check every profile's files against the sha256 recorded in its profile.json before "
                        "serving (/health answers only after); a profile that fails is out of service "
                        "(default: the same check in the background after start)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, v in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue), ("--max-n", args.max_n),
                    ("--max-body-bytes", args.max_body_bytes), ("--max-prefill-tokens", args.max_prefill_tokens)):
        if v < 1:
            sys.exit(f"emo-serve: {name} must be at least 1")
    keys = list(args.api_key) + [k for k in os.environ.get("EMO_SERVE_API_KEYS", "").split(",") if k.strip()]

    import torch
    import uvicorn

    from .app import build_state, create_app
    from .config import ServerConfig
    from .registry import StartupError

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from modeling.loader import default_threads
        default_threads()
    cfg = ServerConfig(model=args.model, profiles=args.profile, profiles_dirs=args.profiles_dir,
                       served_model_name=args.served_model_name, host=args.host, port=args.port, api_keys=keys,
                       max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                       max_prefill_tokens=args.max_prefill_tokens, device=args.device, dtype=args.dtype,
                       quantize=args.quantize, compile=args.compile,
                       max_body_bytes=args.max_body_bytes, max_n=args.max_n, max_logprobs=args.max_logprobs,
                       request_timeout=args.request_timeout, log_level=args.log_level, verify=args.verify)
    try:
        state = build_state(cfg, t0=_T0)
    except StartupError as e:
        sys.exit(f"emo-serve: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        logging.getLogger("emo_serve").warning("binding %s without --api-key: anyone who reaches it can use it",
                                               args.host)
    reg = state.registry
    if args.mlock:
        pinned = reg.model.pin(reg.union_pool() if reg.profiles else None)
        logging.getLogger("emo_serve").info("--mlock: %s of %.2f GiB (%d quantized matrices repacked)%s",
                                            pinned["method"], pinned["bytes"] / 1024**3, pinned["repacked_matrices"],
                                            f"; {pinned['error']}" if "error" in pinned else "")
    logging.getLogger("emo_serve").info("serving %s with profiles %s on http://%s:%d (ready %.2fs after start)",
                                        reg.base_name, reg.names() or "(none)", args.host, args.port,
                                        time.monotonic() - _T0)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5, server_header=False)


if __name__ == "__main__":
    main()
