"""`load_model`: a checkpoint folder (or Hugging Face repo id) to a runnable `Model`."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig, load_config, parse_dtype
from .quant import Int8Cache, PackedLinear, read_quantization_config
from .quant.fp8 import Fp8Matrix
from .quant.mxfp4 import DequantCache
from .layers.cache import KVCache
from .transformer import Batch, ForwardOutput, Pool, PoolError, ResolvedPool, Transformer
from .io.profile import ProfileManifest, base_identity
from .io.safetensors_io import CheckpointFiles
from .engine_core import EngineCore, Sequence
from .output_processor import SeqOutput
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .expert_store import ExpertStore, LayerExperts
from .io.weights import PROFILE_FILE, TensorNames, _Reader, original_expert_ids, read_layer_experts, read_weights, weight_bytes

# Only what a checkpoint needs: never optimizer states or other formats.
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "profile.json",
                "chat_template.jinja",
                "kept_experts.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(FileNotFoundError):
    pass


class ModelUnusable(RuntimeError):
    """The files every forward reads are gone or changing (`Model.unusable`)."""


def resolve_checkpoint(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id fetched (or found in
    the local hub cache; HF_HUB_OFFLINE=1 never touches the network)."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo)
    if p.exists() or not _REPO_ID.match(s):
        raise ModelNotFound(f"{s}: not a checkpoint folder (and not a Hugging Face repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub reads its environment once, at import; read it per call so
    # HF_HUB_CACHE / HF_HUB_OFFLINE set later (by a CLI flag or a test) count.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id=s, revision=revision, allow_patterns=HUB_PATTERNS,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFound(f"{s}: cannot get it from the Hugging Face hub ({type(e).__name__}: {e})") from None


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[float]  # of each token of token_ids


class Model:
    """A loaded checkpoint: config, weight views, the forward pass, the tokenizer."""

    def __init__(self, path: Path, config: ModelConfig, files: CheckpointFiles, dtype: torch.dtype,
                 device: torch.device, quantize: str | None = None, compile: bool = False):
        self.path, self.config, self.files, self.dtype, self.device = path, config, files, dtype, device
        self.name = path.name
        self.quantize = quantize
        self.is_profile = (path / PROFILE_FILE).is_file()
        self.weights = read_weights(path, files, config, dtype, device,
                                    repaired=self.is_profile and bool(ProfileManifest.read(path).repair))
        # per source folder: (config, reader, original ids per layer, repaired), read once
        self._source_info: dict[str, tuple[ModelConfig, _Reader, list[list[int]], bool]] = {}
        # every expert slot, the mapped sources and what changes them (merge, withdraw, bytes, pinning)
        self.experts = ExpertStore([lw.experts for lw in self.weights.layers], str(path), files,
                                   self._layer_experts_of)
        # Set (under `lock`) when the model's own files can no longer be read: every forward refuses
        self.unusable: str | None = None
        # A forward pass and a re-pointing of expert slots (withdraw: a server's verifier
        # thread) never interleave: a pass sees the slots all before or all after.
        self.lock = threading.RLock()
        self._mapped: list[tuple[int, int]] = []
        self._note_mappings(files)
        int8 = Int8Cache(dtype, self._mapped) if quantize == "int8" else None
        self.transformer = Transformer(config, self.weights, dtype, device, int8, compile_decode=compile)
        self.tokenizer = (Tokenizer(path, config.eos_token_ids, config.pad_token_id)
                          if (path / "tokenizer.json").is_file() else None)
        self.identity = base_identity(path)

    def mark_unusable(self, reason: str) -> None:
        """No forward runs after this returns (it waits for the one in flight)."""
        with self.lock:
            self.unusable = reason

    @property
    def sources(self) -> dict[str, CheckpointFiles]:
        """The mapped checkpoint folders (the model's own first), by folder."""
        return self.experts.sources

    def _note_mappings(self, files: CheckpointFiles) -> None:
        self._mapped.extend(r for f in files.files.values() if (r := f.address_range()) is not None)

    # -- experts ---------------------------------------------------------------
    def expert_ids(self, layer: int) -> list[int]:
        le = self.weights.layers[layer].experts
        return [] if le is None else list(le.ids)

    def layer_experts(self, layer: int) -> LayerExperts | None:
        return self.weights.layers[layer].experts

    def add_experts_from(self, folder: str | Path, take_over_base: bool = True) -> dict[int, list[int]]:
        """Map another checkpoint of the same base (a profile folder) and add the
        experts this model lacks. An expert that an earlier profile already
        provides is shared, not mapped twice; one that only the base checkpoint
        provides is taken over by this profile's shards when `take_over_base`
        (the base's copy then stays untouched on disk). Returns {layer: ids}."""
        folder = Path(folder)
        ident = base_identity(folder)
        if ident.get("id") != self.identity.get("id"):
            raise PoolError(f"{folder}: cut from base {ident.get('name')!r} ({ident.get('id')}), "
                            f"but this model is {self.identity.get('name')!r} ({self.identity.get('id')})")
        for f in (folder, self.path):
            if (f / PROFILE_FILE).is_file() and ProfileManifest.read(f).repair:
                # repaired experts are new bytes under the base's expert ids: sharing them by id would
                # serve one profile's repaired expert to another (or to "full")
                raise PoolError(f"{f}: its experts were repaired (profile.json \"repair\"): they are its own, "
                                "not the base's; serve it on its own (emo-serve --profile DIR), not beside the "
                                "base or other profiles")
        cfg = load_config(folder)
        if cfg.num_layers != self.config.num_layers or cfg.hidden_size != self.config.hidden_size:
            raise PoolError(f"{folder}: shape differs from {self.path}")
        if str(folder) not in self.sources:
            files = self.sources[str(folder)] = CheckpointFiles(folder)
            self._note_mappings(files)
        # Only a full base gives its experts up; a profile loaded as the model
        # keeps serving its own.
        take_over = str(self.path) if take_over_base and not self.is_profile else None
        return self.experts.merge(str(folder), take_over)

    def withdraw(self, folder: str | Path) -> dict[int, list[int]]:
        """Stop using the bytes of `folder` (an added profile found corrupt): every
        expert slot it provides is re-pointed, with its router row, to the same
        expert of another mapped source (the base first, then profiles in the order
        they were added) that has not been withdrawn. Returns {layer: original ids}
        that no sound source holds (they keep the withdrawn bytes; callers must not
        route to them). The model's own checkpoint cannot be withdrawn: its
        non-expert weights are the ones every forward runs on."""
        key = str(Path(folder))
        if key == str(self.path):
            raise PoolError(f"{folder}: the model's own checkpoint cannot be withdrawn")
        with self.lock:  # after the forward pass in flight, before the next
            return self.experts.withdraw(key)

    def _layer_experts_of(self, source: str, layer: int) -> LayerExperts | None:
        """Views of layer `layer`'s experts in one mapped source (None: it has none there)."""
        if source not in self._source_info:
            folder = Path(source)
            cfg = self.config if source == str(self.path) else load_config(folder)
            repaired = (folder / PROFILE_FILE).is_file() and bool(ProfileManifest.read(folder).repair)
            self._source_info[source] = (cfg, self._reader(folder, self.sources[source], cfg),
                                         original_expert_ids(folder, cfg), repaired)
        cfg, reader, orig, repaired = self._source_info[source]
        if not cfg.experts_per_layer[layer]:
            return None
        return read_layer_experts(Path(source), self.sources[source], cfg, layer, reader, orig[layer], repaired)

    def _reader(self, folder: Path, files: CheckpointFiles, cfg: ModelConfig) -> _Reader:
        """Views of a mapped source's tensors, read with that source's own quantization."""
        return _Reader(files, self.dtype, self.device,
                       read_quantization_config(cfg.raw.get("quantization_config"), str(folder / "config.json")),
                       cfg.fp8_block)

    def expert_bytes(self, layer: int, orig_id: int) -> int:
        return self.experts.expert_bytes(layer, orig_id)

    def non_expert_bytes(self) -> int:
        w = self.weights
        ts = [w.embed, w.final_norm] + ([] if w.lm_head is w.embed else [w.lm_head])
        for lw in w.layers:
            ts += [lw.attn_norm, lw.mlp_norm] + [t for _, t in lw.attn.named_tensors()]
            if lw.experts is not None:
                ts.append(lw.experts.router)
                if lw.experts.logit_bias is not None:
                    ts.append(lw.experts.logit_bias)
            if lw.dense is not None:
                ts += lw.dense.matrices()
            if lw.shared_mlp is not None:
                ts += lw.shared_mlp.matrices()
            if lw.shared_gate is not None:
                ts.append(lw.shared_gate)
        return sum(weight_bytes(t) for t in ts)

    def pin(self, pool: Pool | None = None) -> dict:
        """Keep in memory what serving `pool` ({layer: original ids}; None: every loaded
        expert) reads: the base weights and those experts (`modeling.io.pinning`).
        Quantized matrices are repacked now (their kernel copies are anonymous memory)."""
        from .io.pinning import pin

        w = self.weights
        mats: list = [w.embed, w.final_norm, w.lm_head]
        for i, lw in enumerate(w.layers):
            mats += [lw.attn_norm, lw.mlp_norm] + [t for _, t in lw.attn.named_tensors()]
            for e in (lw.dense, lw.shared_mlp):
                if e is not None:
                    mats += e.matrices()
            mats.append(lw.shared_gate)
        mats += self.experts.pinned_matrices(pool)
        tensors, repacked = [], 0
        kernels = self.transformer.kernels
        for m in mats:
            if isinstance(m, PackedLinear) and not kernels.native:
                m.prepare(self.dtype)
                repacked += 1
            elif isinstance(m, PackedLinear):  # the native kernels' interleaved copy (or the mapped bytes)
                repacked += kernels.prepare(m)
                tensors += m.tensors()
            elif isinstance(m, Fp8Matrix):  # as stored: FP8 bytes and scales
                tensors += m.tensors()
            elif m is not None:
                tensors.append(m)
        return {**pin(tensors), "repacked_matrices": repacked}

    # -- running ---------------------------------------------------------------
    def resolve_pool(self, pool: Pool | ResolvedPool | None) -> ResolvedPool | None:
        if pool is None or isinstance(pool, ResolvedPool):
            return pool
        return self.transformer.resolve_pool(pool)

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.config, num_slots, max_len, self.dtype, self.device)

    def forward(self, batch: Batch, cache: KVCache, logits_at: str | Tensor = "last",
                collect_router_probs: bool = False, collect_routes: bool = False) -> ForwardOutput:
        with self.lock:
            if self.unusable is not None:
                raise ModelUnusable(f"the model's weights cannot be read: {self.unusable}")
            return self.transformer.forward(batch, cache, logits_at, collect_router_probs, collect_routes)

    def logits(self, token_ids: list[int] | Tensor, pool: Pool | ResolvedPool | None = None) -> Tensor:
        """`[len(token_ids), vocab]` float32 logits of one sequence."""
        return self._run_one(token_ids, pool, collect_router_probs=False).logits

    def router_probs(self, token_ids: list[int] | Tensor, pool: Pool | ResolvedPool | None = None) -> list[Tensor | None]:
        """Per layer, the routing softmax `[len(token_ids), S]` over loaded slots."""
        return self._run_one(token_ids, pool, collect_router_probs=True).router_probs

    def routes(self, token_ids: list[int] | Tensor, pool: Pool | ResolvedPool | None = None) -> ForwardOutput:
        """One forward of one sequence that reports, per layer, the experts it chose
        for every token (`ForwardOutput.routes`, original ids) and the routing
        softmax (`router_probs`); logits of the last row only."""
        return self._run_one(token_ids, pool, collect_router_probs=True, collect_routes=True)

    def _run_one(self, token_ids, pool, collect_router_probs: bool, collect_routes: bool = False) -> ForwardOutput:
        """One sequence through a cache of its own length: every row's logits, or
        (when collecting routing) only the last row's."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        self.check_tokens(ids.tolist())
        cache = self.new_cache(1, ids.numel())
        batch = Batch(ids, [0], [0], [ids.numel()], [self.resolve_pool(pool)])
        rows = torch.tensor([ids.numel() - 1]) if collect_router_probs or collect_routes else "all"
        return self.forward(batch, cache, logits_at=rows, collect_router_probs=collect_router_probs,
                            collect_routes=collect_routes)

    def check_tokens(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    @property
    def eos_ids(self) -> set[int]:
        """The ids that end a sequence (unless `ignore_eos`): the config's and the tokenizer's."""
        return set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])

    @torch.inference_mode()
    def generate(self, prompt: list[int] | str, params: SamplingParams | None = None,
                 pool: Pool | ResolvedPool | None = None) -> Generation:
        """Generate for one prompt, synchronously: a driver of the server's own
        engine core (`modeling.engine_core`) with one sequence, and of the output
        processor after each step (as vLLM's `LLM` drives its engine); the server
        adds batching across sequences, a queue and a thread."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        self.check_tokens(ids)
        max_len = min(len(ids) + params.max_tokens, self.config.max_position_embeddings)
        core = EngineCore(self, max_batch=1, max_model_len=max_len, max_prefill_tokens=len(ids))
        events: list = []
        seq = Sequence(ids, params, "", events.append, logprobs=0)
        seq.pool = self.resolve_pool(pool)
        out = SeqOutput(params, self.tokenizer)
        tokens: list[int] = []
        lps: list[float] = []
        finish = None
        core.add(seq)
        while finish is None:
            core.step()
            if not events:
                raise RuntimeError("the engine core dropped the sequence")
            for ev in events:
                if ev.error is not None:
                    raise RuntimeError(ev.error[2])
                out.process(ev)  # a stop string ends it here: nothing past it is kept
                tokens += [t.token_id for t in ev.tokens]
                lps += [t.logprob for t in ev.tokens]
                finish = finish or ev.finish_reason
            events.clear()
        return Generation(tokens, out.text.text if self.tokenizer is not None else "", finish, lps)


QUANTIZE_CHOICES = (None, "int8")


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               revision: str | None = None, quantize: str | None = None, compile: bool = False,
               mxfp4_cache_bytes: int = 0) -> Model:
    """Load a checkpoint for inference.

    dtype None keeps the checkpoint's dtype (zero-copy); another dtype converts
    the weights (a copy). `path` may be a Hugging Face repo id. `quantize="int8"`
    makes weight-only int8 copies of the matrices (router excepted) as they are
    first used: about half the bytes per decoded token, not bit-exact.
    `compile=True` runs one-row bf16 products (single-sequence decode) through
    a TorchInductor-compiled GEMV (`modeling.kernels`): faster, compiled on
    first use per matrix shape. `mxfp4_cache_bytes` > 0 keeps up to that many
    bytes of dequantized MXFP4 experts (least recently used out); 0 dequantizes
    an MXFP4 expert at every use and holds only its 4-bit bytes.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
    folder = resolve_checkpoint(path, revision)
    cfg = load_config(folder)
    files = CheckpointFiles(folder)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    # The checkpoint's dtype is the one its tensors are stored in (config's
    # torch_dtype is only a hint); keeping it is what makes loading zero-copy.
    stored = files.info(cfg.names.embed).dtype if cfg.names.embed in files else cfg.dtype
    dt = parse_dtype(dtype) or stored or torch.float32
    if quantize == "int8" and dev.type != "cpu":
        raise ValueError("quantize='int8' is implemented for the CPU only")
    model = Model(folder, cfg, files, dt, dev, quantize, compile)
    if mxfp4_cache_bytes > 0:
        model.transformer.mxfp4_cache = DequantCache(mxfp4_cache_bytes)
    return model
