"""The profiles this server hosts, and the model whose loaded experts they share.

A profile is a *name* (never a path a client can give) bound to a pool of
original expert ids per layer, resolved once to slot masks. Sources:

- a profile folder written by `emo-subset` (a standalone checkpoint plus
  `profile.json`, read with `modeling.ProfileManifest`): its experts are mapped
  from its own shards; an expert that several profiles of the same base keep
  (same layer and original id) exists once (`Model.add_experts_from`);
- `name=experts.json` over a full `--model`: `{layer: [original ids]}`; only
  those experts are ever touched.

Two names are reserved: `full` (every loaded expert) and `auto` (the profile
whose centroid fingerprint is nearest to the prompt's routing).

Verification (docs/profiles.md): every profile folder is checked against its
profile.json (manifest hash, sha256 of every file), in a background thread
after start or before serving (`--verify`). A profile that fails is taken out
of service (requests naming it get 503) and the model stops using its bytes
(`Model.withdraw`): the experts it provided to `full` and to other profiles
come from a sound source again, and those only it held leave `full`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import modeling
from modeling import Model, ProfileManifest, ResolvedPool, load_model
from modeling.io.profile import verify_profile

from .config import ServerConfig
from .errors import APIError, bad_request, not_found
from .memory import resident_bytes

log = logging.getLogger("emo_serve.registry")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FULL, AUTO = "full", "auto"
AUTO_RULES = ("fit", "affinity", "centroid", "perplexity")
RESERVED = {FULL, AUTO}
BUNDLED = Path(modeling.__file__).resolve().parent / "bundled" / "emo-demo"


class StartupError(RuntimeError):
    """A configuration the server cannot start with (the message says why)."""


def valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(NAME_RE.match(name))


@dataclass
class Profile:
    name: str
    kind: str  # "folder", "experts-file" or "full"
    pool: dict[int, list[int]] | None  # original ids per MoE layer; None: every loaded expert
    resolved: ResolvedPool | None
    manifest: ProfileManifest | None = None
    source: str = ""  # folder or file name (not shown to clients as a path)
    centroid: torch.Tensor | None = field(default=None, repr=False)  # over loaded experts, all layers
    folder: Path | None = None  # a profile folder: where its files are (verified against profile.json)
    # "verifying" -> "verified" | "failed"; "unchecked": nothing recorded to check (experts files, full)
    state: str = "unchecked"
    problems: list[str] = field(default_factory=list)  # why it failed verification


def _profile_folders(cfg: ServerConfig) -> tuple[list[Path], list[tuple[str, Path]]]:
    folders: list[Path] = []
    lists: list[tuple[str, Path]] = []
    for spec in cfg.profiles:
        p = Path(spec).expanduser()
        if not p.is_dir() and "=" in spec:
            name, f = spec.split("=", 1)
            lists.append((name, Path(f).expanduser()))
            continue
        if not (p / "profile.json").is_file():
            raise StartupError(f"--profile {spec}: not a profile folder (no profile.json); "
                               "use NAME=experts.json for a list of expert ids")
        folders.append(p)
    for d in cfg.profiles_dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise StartupError(f"--profiles-dir {d}: not a folder")
        found = sorted(s for s in root.iterdir() if (s / "profile.json").is_file())
        real_root = root.resolve()
        for s in found:
            # whoever may write into DIR must not be able to make the server map files from elsewhere
            real = s.resolve()
            if real != real_root and real_root not in real.parents:
                raise StartupError(f"--profiles-dir {d}: {s.name} is a symlink to {real}, outside {real_root}; "
                                   "refused (pass it as --profile DIR if it is meant to be served)")
        if not found:
            log.warning("--profiles-dir %s: no profile folders in it", d)
        folders += found
    return folders, lists


def build_model(base: str | Path | None, folders: list[Path], dtype: str | None, device: str,
                quantize: str | None = None, compile: bool = False, mxfp4_cache_bytes: int = 0,
                failed: dict[Path, str] | None = None) -> Model:
    """The model that serves `folders`' experts (and the base's, when given).

    Each profile's experts come from its own shards: `add_experts_from` takes
    over the experts a full base provides, and an expert kept by several
    profiles is mapped once, from the first profile that holds it. The base
    serves only the experts no profile keeps (used by profile "full").
    """
    if base is None:
        if not folders:
            raise StartupError("no --model and no --profile to serve")
        model = load_model(folders[0], dtype=dtype, device=device, quantize=quantize, compile=compile,
                           mxfp4_cache_bytes=mxfp4_cache_bytes)
        rest = folders[1:]
    else:
        model = load_model(base, dtype=dtype, device=device, quantize=quantize, compile=compile,
                           mxfp4_cache_bytes=mxfp4_cache_bytes)
        rest = folders
    for f in rest:
        try:
            model.add_experts_from(f)
        except (modeling.CheckpointError, OSError) as e:
            # a profile whose files cannot be mapped (a shard that is not safetensors, unreadable)
            # leaves service alone, as one whose hashes differ does; the others are served
            if failed is None:
                raise
            if str(f) in model.sources:  # whatever it provided before failing is served from elsewhere
                model.withdraw(f)
            failed[f] = f"its files cannot be mapped: {e}"
            log.error("profile folder %s is out of service: %s", f, failed[f])
    return model


class Registry:
    def __init__(self, model: Model, base_name: str, profiles: list[Profile], auto_rule: str = "fit",
                 auto_min_fit: float = 0.0):
        if auto_rule not in AUTO_RULES:
            raise StartupError(f"--auto-rule {auto_rule!r}: one of {', '.join(AUTO_RULES)}")
        if not 0.0 <= auto_min_fit <= 2.0:
            raise StartupError(f"--auto-min-fit {auto_min_fit}: expected a number from 0 (never fall back) to 2")
        self.model, self.base_name, self.auto_rule = model, base_name, auto_rule
        self.auto_min_fit = auto_min_fit
        self.profiles: dict[str, Profile] = {}
        for p in profiles:
            if p.name in self.profiles:
                raise StartupError(f"two profiles are named {p.name!r}")
            self.profiles[p.name] = p
        self.full = Profile(FULL, "full", None, None)
        self.moe_layers = [i for i in range(model.config.num_layers) if not model.config.is_dense(i)]
        for p in profiles:
            p.centroid = self._centroid_over_loaded(p)
        # Set when the weights every forward runs on failed verification: nothing is served.
        self.unavailable: str | None = None
        self._verifier: threading.Thread | None = None

    # -- building ----------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ServerConfig) -> "Registry":
        folders, lists = _profile_folders(cfg)
        base = cfg.model
        if base is None and not folders and not lists:
            if not (BUNDLED / "config.json").is_file():
                raise StartupError(f"no --model given and the bundled demo model is missing ({BUNDLED}); "
                                   "pass --model PATH or --profile DIR")
            base = str(BUNDLED)
            pdir = BUNDLED / "profiles"
            if pdir.is_dir():
                folders = sorted(s for s in pdir.iterdir() if (s / "profile.json").is_file())
        if lists and base is None:
            raise StartupError("a profile given as a list of expert ids needs a full --model")
        unmappable: dict[Path, str] = {}
        try:
            model = build_model(base, folders, cfg.dtype, cfg.device, cfg.quantize, cfg.compile,
                                cfg.mxfp4_cache_bytes, unmappable)
        except StartupError:
            raise
        except (modeling.ModelNotFound, modeling.ConfigError, modeling.CheckpointError, modeling.PoolError,
                modeling.ProfileError, OSError, ValueError, RuntimeError) as e:
            raise StartupError(f"cannot load the model: {e}") from None
        profiles: list[Profile] = []
        for f in folders:
            m = ProfileManifest.read(f)
            if not valid_name(m.name) or m.name in RESERVED:
                raise StartupError(f"{f}: profile name {m.name!r} is not a valid name "
                                   f"({NAME_RE.pattern}, not {sorted(RESERVED)})")
            if f in unmappable:
                prof = Profile(m.name, "folder", m.pool(), None, m, f.name, state="failed", problems=[unmappable[f]])
            else:
                prof = cls._make(model, m.name, "folder", m.pool(), m, f.name)
                prof.state = "verifying"
            prof.folder = f
            profiles.append(prof)
        for name, path in lists:
            if not valid_name(name) or name in RESERVED:
                raise StartupError(f"--profile {name}=...: {name!r} is not a valid profile name")
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                pool = {int(k): sorted({int(x) for x in v}) for k, v in d.items()}
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise StartupError(f"{path}: expected a JSON object {{layer: [expert ids]}} ({e})") from None
            profiles.append(cls._make(model, name, "experts-file", pool, None, path.name))
        if base is None:
            base_name = cfg.served_model_name or ProfileManifest.read(folders[0]).base.get("name") or model.name
        else:
            base_name = cfg.served_model_name or Path(str(base)).name
        if not valid_name(base_name):
            base_name = re.sub(r"[^A-Za-z0-9._-]", "-", base_name).strip("-._")[:64] or "model"
        return cls(model, base_name, profiles, cfg.auto_rule, cfg.auto_min_fit)

    @staticmethod
    def _make(model: Model, name: str, kind: str, pool: dict[int, list[int]], manifest: ProfileManifest | None,
              source: str) -> Profile:
        cfg = model.config
        for layer in pool:
            if not 0 <= layer < cfg.num_layers or cfg.is_dense(layer):
                raise StartupError(f"profile {name!r}: layer {layer} is not a MoE layer of the model")
        try:
            resolved = model.resolve_pool(pool)
        except modeling.PoolError as e:
            raise StartupError(f"profile {name!r}: {e}") from None
        return Profile(name, kind, pool, resolved, manifest, source)

    # -- lookup ------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.profiles)

    def select(self, model_field: str | None, profile_field: str | None) -> str:
        """The profile name a request asks for (`full`, `auto` or a hosted one)."""
        from_model = None
        if model_field is not None and model_field != "":
            base, sep, suffix = model_field.partition(":")
            if base != self.base_name:
                raise not_found(f"model {model_field!r} does not exist; this server serves {self.base_name!r} "
                                f"(as '{self.base_name}' or '{self.base_name}:<profile>')", "model", "model_not_found")
            if sep:
                from_model = self._check(suffix, "model")
        from_profile = self._check(profile_field, "profile") if profile_field is not None else None
        if from_model and from_profile and from_model != from_profile:
            raise bad_request(f"model names profile {from_model!r} but profile is {from_profile!r}", "profile",
                              "profile_mismatch")
        name = from_profile or from_model or FULL
        if self.unavailable is not None:
            raise APIError(503, f"the server's weights failed verification, nothing is served: {self.unavailable}",
                           "unavailable", None, "model_unavailable")
        p = self.profiles.get(name)
        if p is not None and p.state == "failed":
            raise APIError(503, f"profile {name!r} is out of service: its files failed verification "
                                f"({'; '.join(p.problems[:3])})", "unavailable",
                           "profile" if from_profile else "model", "profile_unavailable")
        return name

    def _check(self, name: str, param: str) -> str:
        if not valid_name(name):
            raise bad_request(f"{param}: {name[:80]!r} is not a profile name (letters, digits, '.', '_', '-'; "
                              "at most 64)", param, "invalid_profile_name")
        if name in RESERVED or name in self.profiles:
            return name
        raise not_found(f"profile {name!r} does not exist; available: "
                        f"{', '.join(sorted(self.profiles) + sorted(RESERVED))}", param, "profile_not_found")

    def get(self, name: str) -> Profile:
        return self.full if name == FULL else self.profiles[name]

    # -- verification ----------------------------------------------------------------
    def verifying(self) -> list[str]:
        """Profiles whose files are not checked yet (served meanwhile)."""
        return [p.name for p in self.profiles.values() if p.state == "verifying"]

    def verify_all(self, again: bool = False) -> None:
        """Check every profile folder against its profile.json; take failures out of
        service. `again`: re-check those already verified (--reverify-interval)."""
        for p in list(self.profiles.values()):
            if p.folder is None or p.state not in (("verifying", "verified") if again else ("verifying",)):
                continue
            try:
                res = verify_profile(p.folder)
                problems = res.problems
            except Exception as e:  # a verifier bug must not pass a profile
                log.exception("verifying profile %r failed", p.name)
                problems = [f"verification could not run ({type(e).__name__})"]
            if problems:
                self.take_out_of_service(p, problems)
            elif p.state != "failed":  # a lease break may have taken it out meanwhile
                if p.state == "verifying":
                    log.info("profile %r verified (%d shards)", p.name, len(res.shards))
                p.state = "verified"

    def start_verification(self, interval: float = 0.0) -> threading.Thread:
        """`verify_all` in a background thread at the lowest CPU priority (hashing
        competes with decoding for cores; requests are served meanwhile); then,
        with `interval` > 0, again every `interval` seconds: a byte changed on
        disk behind the server's back (no lease sees a bit flip) takes its
        profile out of service at the next pass."""
        def run() -> None:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
            except (AttributeError, OSError):
                pass
            self.verify_all()
            while interval > 0:
                time.sleep(interval)
                self.verify_all(again=True)

        self._verifier = threading.Thread(target=run, name="emo-verify", daemon=True)
        self._verifier.start()
        return self._verifier

    def file_changing(self, source: str, path: str) -> None:
        """Another process is truncating or writing `path`, a file of the mapped
        source `source` (server.leases): stop reading its bytes now. A profile's
        file takes that profile out of service (its experts re-pointed); a file of
        the model itself stops every forward, and nothing is served."""
        why = f"its file {Path(path).name} is being truncated or written by another process"
        if source == str(self.model.path):
            self.unavailable = f"the model's file {path} is being truncated or written by another process"
            self.model.mark_unusable(self.unavailable)
            self.full.state, self.full.problems = "failed", [self.unavailable]
            log.error("nothing is served: %s", self.unavailable)
            return
        for p in self.profiles.values():
            if p.folder is not None and str(p.folder) == source and p.state != "failed":
                self.take_out_of_service(p, [why])

    def take_out_of_service(self, p: Profile, problems: list[str]) -> None:
        p.state, p.problems = "failed", list(problems)
        log.error("profile %r is out of service, its files failed verification: %s", p.name, "; ".join(problems))
        if str(p.folder) == str(self.model.path):
            # No --model: this profile's checkpoint holds the attention, embeddings and
            # router every request runs on. Nothing sound is left to serve.
            self.unavailable = f"profile {p.name!r} (the checkpoint the server runs on): {'; '.join(problems[:3])}"
            self.full.state, self.full.problems = "failed", [self.unavailable]
            log.error("nothing is served: %s", self.unavailable)
            return
        orphans = self.model.withdraw(p.folder)
        if not orphans:
            return
        # Experts only this profile held: `full` routes without them from now on, and so must
        # any other profile that keeps them (none can be sound: a sound one would have held them).
        pool = {i: [e for e in self.model.expert_ids(i) if e not in orphans.get(i, ())] for i in self.moe_layers}
        self.full.pool, self.full.resolved = pool, self.model.resolve_pool(pool)
        self.full.problems = [f"left out {sum(len(v) for v in orphans.values())} experts that only the failed "
                              f"profile {p.name!r} held"]
        for other in self.profiles.values():
            if other is not p and other.state != "failed" and any(
                    set(other.pool.get(i) or ()) & set(ids) for i, ids in orphans.items()):
                self.take_out_of_service(other, [f"uses experts that only the failed profile {p.name!r} held"])

    # -- automatic choice and affinity ------------------------------------------------
    def _centroid_over_loaded(self, p: Profile) -> torch.Tensor | None:
        c = p.manifest.centroid if p.manifest is not None else None
        if not c:
            return None
        parts = []
        for i in self.moe_layers:
            row = c[i] if i < len(c) else []
            ids = self.model.expert_ids(i)
            parts.append(torch.tensor([float(row[e]) if e < len(row) else 0.0 for e in ids]))
        v = torch.cat(parts)
        return v / v.norm().clamp_min(1e-12)

    def has_auto(self) -> bool:
        if self.auto_rule == "centroid":
            return any(p.centroid is not None for p in self.profiles.values())
        return bool(self.profiles)

    def fits(self, router_probs: list[torch.Tensor | None]) -> dict[str, float]:
        """Per hosted profile: the prompt's affinity (share of its routed mass inside
        the pool) over the share the pool holds of its own calibration text (the mean
        coverage of profile.json; 1 when unknown). About 1 when the prompt routes
        like the profile's domain; a profile with a large pool of popular experts no
        longer wins every prompt (reports/subset/README.md, profile "auto")."""
        aff = self.affinity(router_probs).mean(0).tolist()
        out = {}
        for (name, p), a in zip(self.profiles.items(), aff):
            cov = [v for v in (p.manifest.coverage.values() if p.manifest is not None else []) if v > 0]
            out[name] = a / (sum(cov) / len(cov)) if cov else a
        return out

    def auto_decision(self, token_ids: list[int], rule: str | None = None,
                      router_probs: list[torch.Tensor | None] | None = None) -> dict:
        """What `auto` decides for a prompt: the profile, each hosted profile's fit,
        the margin of the best fit over the next, and whether it fell back to `full`
        (the best fit below the operator's `--auto-min-fit`). Runs forwards: only the
        engine thread calls it. `router_probs`: the full model's routing of the
        prompt, when the caller has it already (saves that forward)."""
        rule = rule or self.auto_rule
        probs = router_probs
        if probs is None and self.profiles:
            probs = self.full_router_probs(token_ids)  # one forward for every rule
        fits = self.fits(probs) if probs is not None else {}
        ranked = self._sound_fits(fits)
        margin = ranked[0] - ranked[1] if len(ranked) > 1 else (ranked[0] if ranked else 0.0)
        fallback = self._falls_back(ranked)
        choice = FULL if fallback else self._choose(token_ids, rule, fits, probs)
        return {"rule": rule, "profile": choice, "fits": {n: round(v, 6) for n, v in fits.items()},
                "margin": round(margin, 6), "threshold": self.auto_min_fit, "fallback": fallback}

    def _sound_fits(self, fits: dict[str, float]) -> list[float]:
        """The fits of the profiles in service, best first."""
        sound = {p.name for p in self.profiles.values() if p.state != "failed"}
        return sorted((v for n, v in fits.items() if n in sound), reverse=True)

    def _falls_back(self, ranked: list[float]) -> bool:
        return not ranked or ranked[0] < self.auto_min_fit

    def auto_falls_back(self, router_probs: list[torch.Tensor | None]) -> bool:
        """Whether `auto` serves `full` for a prompt of this full-model routing: no
        profile in service fits it as well as `--auto-min-fit` asks (every rule)."""
        return self._falls_back(self._sound_fits(self.fits(router_probs)))

    def choose_auto(self, token_ids: list[int], rule: str | None = None,
                    router_probs: list[torch.Tensor | None] | None = None) -> str:
        """The hosted profile `auto` picks for a prompt (`auto_decision`'s profile)."""
        return self.auto_decision(token_ids, rule, router_probs)["profile"]

    def _choose(self, token_ids: list[int], rule: str, fits: dict[str, float], probs) -> str:
        """By `rule`: `fit` (the best affinity relative to the profile's own coverage),
        `affinity` (most of the full router's mass inside the profile's pool), `centroid`
        (nearest centroid fingerprint, cosine) or `perplexity` (least perplexity of the
        prompt under the profile); `full` when no hosted profile qualifies."""
        sound = [p for p in self.profiles.values() if p.state != "failed"]  # never an out-of-service one
        if rule == "fit":
            return max(sound, key=lambda p: fits[p.name]).name if sound else FULL
        if rule == "affinity":
            if not sound:
                return FULL
            shares = dict(zip(self.names(), self.affinity(probs).mean(0).tolist()))
            return max(sound, key=lambda p: shares[p.name]).name
        if rule == "perplexity":
            if not sound or len(token_ids) < 2:
                return self._choose(token_ids, "affinity", fits, probs)
            nll = {p.name: self.prompt_nll(token_ids, p) for p in sound}
            return min(nll, key=nll.get)
        if rule != "centroid":
            raise ValueError(f"unknown auto rule {rule!r} (one of {', '.join(AUTO_RULES)})")
        cands = [p for p in self.profiles.values() if p.centroid is not None and p.state != "failed"]
        if not cands:
            return FULL
        v = torch.cat([probs[i].float().mean(0).cpu() for i in self.moe_layers])
        v = v / v.norm().clamp_min(1e-12)
        best = max(cands, key=lambda p: float(v @ p.centroid))
        return best.name

    def perplexity_candidates(self, token_ids: list[int]) -> list[Profile]:
        """The profiles the perplexity rule scores for this prompt (none: it falls
        back to affinity, as for a one-token prompt)."""
        return [p for p in self.profiles.values() if p.state != "failed"] if len(token_ids) >= 2 else []

    def prompt_nll(self, token_ids: list[int], p: Profile) -> float:
        """Mean negative log-likelihood of the prompt under profile `p` (one forward)."""
        ids = torch.tensor(token_ids)
        lp = torch.log_softmax(self.model.logits(ids, pool=p.resolved)[:-1].float(), -1)
        return -float(lp.gather(1, ids[1:, None]).mean())

    def full_router_probs(self, token_ids: list[int]) -> list[torch.Tensor | None]:
        """The routing softmax of profile `full` (every expert a sound source holds)."""
        return self.model.router_probs(token_ids, self.full.resolved)

    def affinity(self, router_probs: list[torch.Tensor | None]) -> torch.Tensor:
        """`[T, profiles]` (in `names()` order): per token, the share of the routing
        mass over routed (non-shared) experts that falls inside each hosted
        profile's pool, averaged over MoE layers. Shared experts are in every
        pool, so they say nothing about a profile and are left out."""
        T = next(p.shape[0] for p in router_probs if p is not None)
        out = torch.zeros(T, len(self.profiles))
        for i in self.moe_layers:
            p = router_probs[i].float().cpu()
            routed = ~self.model.layer_experts(i).shared_mask.cpu()
            tot = (p * routed).sum(1).clamp_min(1e-12)
            for j, prof in enumerate(self.profiles.values()):
                if prof.resolved is None:  # its files could not be mapped: no share of anything
                    continue
                m = prof.resolved.masks[i]
                inside = routed if m is None else routed & m.cpu()
                out[:, j] += (p * inside).sum(1) / tot
        return out / max(len(self.moe_layers), 1)

    # -- reporting -----------------------------------------------------------------
    def _expert_tensors(self, pool: dict[int, list[int]] | None) -> tuple[list[torch.Tensor], dict[int, int], int]:
        tensors, per_layer, nbytes = [], {}, 0
        for i in self.moe_layers:
            le = self.model.layer_experts(i)
            loaded = set(le.ids)  # a profile whose files could not be mapped may name experts nobody loaded
            ids = le.ids if pool is None or pool.get(i) is None else [e for e in pool[i] if e in loaded]
            per_layer[i] = len(ids)
            for e in ids:
                ex = le.experts[le.slot_of(e)]
                tensors += ex.tensors()
                nbytes += ex.nbytes()
        return tensors, per_layer, nbytes

    def describe(self, with_residency: bool = True) -> dict:
        m = self.model
        non_expert = m.non_expert_bytes()
        data = []
        for p in [*self.profiles.values(), self.full]:
            tensors, per_layer, nbytes = self._expert_tensors(p.pool)
            res = resident_bytes(tensors) if with_residency else None
            cov = p.manifest.coverage if p.manifest else {}
            entry = {
                "name": p.name,
                "id": p.name if p.name == FULL else f"{self.base_name}:{p.name}",
                "kind": p.kind,
                "experts_per_layer": {str(k): v for k, v in per_layer.items()},
                "experts": {str(i): (self.model.expert_ids(i) if p.pool is None or p.pool.get(i) is None
                                     else list(p.pool[i])) for i in self.moe_layers},
                "experts_total": sum(per_layer.values()),
                "bytes": {"experts": nbytes, "non_expert": non_expert, "total": nbytes + non_expert},
                "coverage": {str(k): v for k, v in sorted(cov.items())} or None,
                "mean_coverage": (sum(cov.values()) / len(cov)) if cov else None,
                "resident": None if res is None else res[0] >= res[1],
                "resident_bytes": None if res is None else res[0],
                "has_centroid": p.centroid is not None,
                "state": p.state,
            }
            if p.problems:
                entry["problems"] = p.problems
            if p.manifest is not None:
                entry["selection"] = p.manifest.selection
                entry["manifest_bytes"] = p.manifest.bytes
                entry["base"] = p.manifest.base
            data.append(entry)
        union_tensors, _, union_bytes = self._expert_tensors(
            None if not self.profiles else self.union_pool())
        return {"object": "list", "base": self.base_name, "non_expert_bytes": non_expert,
                "profiles_union_expert_bytes": union_bytes,
                "loaded_expert_bytes": self._expert_tensors(None)[2], "data": data}

    def union_pool(self) -> dict[int, list[int]]:
        """Every expert some hosted profile in service routes to, per layer."""
        union: dict[int, set[int]] = {}
        for p in self.profiles.values():
            if p.state == "failed":
                continue
            for i in self.moe_layers:
                ids = self.model.expert_ids(i) if p.pool is None or p.pool.get(i) is None else p.pool[i]
                union.setdefault(i, set()).update(ids)
        return {i: sorted(s) for i, s in union.items()}

    def resident_expert_bytes(self, name: str) -> int | None:
        p = self.get(name)
        res = resident_bytes(self._expert_tensors(p.pool)[0])
        return None if res is None else res[0]
