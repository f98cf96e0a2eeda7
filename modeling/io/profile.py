"""`profile.json`: the manifest of a profile folder (docs/profiles.md), and its verification.

The manifest format lives here, beside the loader, so that the server can read
and verify profiles without importing the subset builder.

Integrity: `shards` holds the sha256 of every safetensors shard, `files` that of
every other file the builder wrote (config.json, the shard index, tokenizer
files), and `manifest_sha256` covers the manifest itself (every field but
itself, as canonical JSON), so an edit of the kept expert ids, of config.json
or of a shard's bytes is found by `verify_profile`. These are checksums against
corruption and accidental edits, not signatures: whoever can write the folder
can recompute them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .safetensors_io import INDEX_NAME, CheckpointFiles, DTYPE_NAMES, sha256_file
from .weights import PROFILE_FILE

FORMAT = "emo-serve-profile/1"


class ProfileError(ValueError):
    pass


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


HASH_FIELD = "manifest_sha256"


def manifest_hash(d: dict[str, Any]) -> str:
    """sha256 of a manifest's parsed JSON without its own hash field (canonical:
    sorted keys, no spaces), so re-indenting the file keeps it and editing a
    value does not."""
    return _sha({k: v for k, v in d.items() if k != HASH_FIELD})


def base_identity(folder: str | Path, name: str | None = None) -> dict[str, str]:
    """Name + hash of a *full* checkpoint's config and tensor index.

    For a profile folder, the identity of the base it was cut from (as its
    manifest records it), so a profile and its base compare equal.
    """
    folder = Path(folder)
    manifest = folder / PROFILE_FILE
    if manifest.is_file():
        return ProfileManifest.read(folder).base
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = CheckpointFiles(folder)
    index = {n: [DTYPE_NAMES[files.info(n).dtype], list(files.info(n).shape)] for n in sorted(files.names())}
    config_sha, index_sha = _sha(config), _sha(index)
    return {
        "name": name or folder.name,
        "config_sha256": config_sha,
        "index_sha256": index_sha,
        "id": hashlib.sha256(f"{config_sha}:{index_sha}".encode()).hexdigest()[:16],
    }


@dataclass
class ProfileManifest:
    name: str
    base: dict[str, str]
    kept_experts: dict[int, list[int]]  # layer -> original ids kept (MoE layers only)
    num_experts_original: list[int]
    selection: dict[str, Any] = field(default_factory=dict)  # {"method": ..., "params": {...}}
    calibration: dict[str, Any] = field(default_factory=dict)  # documents, tokens, domains
    coverage: dict[int, float] = field(default_factory=dict)  # layer -> share of full router mass kept
    centroid: list[list[float]] | None = None  # [layers][original experts] mean router softmax
    bytes: dict[str, int] = field(default_factory=dict)  # total, experts, non_expert
    shards: dict[str, str] = field(default_factory=dict)  # shard file -> sha256
    files: dict[str, str] = field(default_factory=dict)  # every other written file (config, index, tokenizer) -> sha256
    created: str = ""
    # how the kept experts are stored when not as plain floats: {"experts": "mxfp4", "requantized": false,
    # "tensors": [...]} (gpt-oss: the base's MXFP4 bytes, copied as they are); absent otherwise
    quantization: dict[str, Any] = field(default_factory=dict)
    # repaired experts (merge / distill / finetune: new bytes, never the base's): {"steps": [...], "data": ...};
    # absent for a plain subset
    repair: dict[str, Any] = field(default_factory=dict)
    # tensors of the base that the profile leaves out, by name prefix -> why (a vision tower that is not served,
    # a multi-token-prediction head that is not run); absent when nothing is left out
    left_out: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    manifest_sha256: str = ""  # over every other field (manifest_hash); set by write()

    def pool(self) -> dict[int, list[int]]:
        return {int(k): list(v) for k, v in self.kept_experts.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_experts"] = {str(k): v for k, v in sorted(self.kept_experts.items())}
        d["coverage"] = {str(k): v for k, v in sorted(self.coverage.items())}
        if not d["quantization"]:
            del d["quantization"]  # manifests of float profiles stay as they were (and their hashes)
        if not d["repair"]:
            del d["repair"]
        if not d["left_out"]:
            del d["left_out"]
        return d

    def write(self, folder: str | Path) -> Path:
        """Write profile.json with its manifest hash (computed over what JSON reads back)."""
        d = json.loads(json.dumps(self.to_dict()))
        self.manifest_sha256 = d[HASH_FIELD] = manifest_hash(d)
        p = Path(folder) / PROFILE_FILE
        p.write_text(json.dumps(d, indent=1))
        return p

    @classmethod
    def read(cls, folder: str | Path) -> "ProfileManifest":
        p = Path(folder) / PROFILE_FILE
        if not p.is_file():
            raise ProfileError(f"{folder}: no {PROFILE_FILE} (not a profile folder)")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT:
                raise ProfileError(f"{p}: unknown format {d.get('format')!r} (expected {FORMAT!r})")
            return cls(
                name=str(d["name"]),
                base=dict(d["base"]),
                kept_experts={int(k): [int(x) for x in v] for k, v in d["kept_experts"].items()},
                num_experts_original=[int(x) for x in d["num_experts_original"]],
                selection=d.get("selection") or {},
                calibration=d.get("calibration") or {},
                coverage={int(k): float(v) for k, v in (d.get("coverage") or {}).items()},
                centroid=d.get("centroid"),
                bytes={k: int(v) for k, v in (d.get("bytes") or {}).items()},
                shards=dict(d.get("shards") or {}),
                files=dict(d.get("files") or {}),
                created=str(d.get("created", "")),
                quantization=dict(d.get("quantization") or {}),
                repair=dict(d.get("repair") or {}),
                left_out=dict(d.get("left_out") or {}),
                manifest_sha256=str(d.get(HASH_FIELD) or ""),
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ProfileError(f"{p}: malformed manifest ({type(e).__name__}: {e})") from None


def shard_files(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
    return ["model.safetensors"]


def file_hashes(folder: str | Path, exclude: set[str]) -> dict[str, str]:
    """sha256 of every plain file in `folder` but profile.json, `exclude` (the shards) and
    hidden files (the atomic writer's marker)."""
    folder = Path(folder)
    return {f.name: sha256_file(f) for f in sorted(folder.iterdir())
            if f.is_file() and f.name != PROFILE_FILE and f.name not in exclude and not f.name.startswith(".")}


@dataclass
class Verification:
    """What `verify_profile` found: `ok` when `problems` is empty."""

    profile: str
    problems: list[str]
    shards: dict[str, bool]  # shard file -> its sha256 matched
    files: dict[str, bool]  # other file -> its sha256 matched

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "ok": self.ok, "shards": self.shards, "files": self.files,
                "problems": self.problems}


def verify_profile(folder: str | Path, on_file: Callable[[str, int], None] | None = None) -> Verification:
    """Check a profile folder against its profile.json: the manifest's own hash,
    the sha256 of every shard and every other file it lists, and that no shard
    is unlisted. `on_file(name, nbytes)` is called after each file is hashed
    (progress). Never raises for a damaged folder: every finding is a problem."""
    folder = Path(folder)
    problems: list[str] = []
    shards: dict[str, bool] = {}
    files: dict[str, bool] = {}
    res = Verification(str(folder), problems, shards, files)
    p = folder / PROFILE_FILE
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        man = ProfileManifest.read(folder)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"{PROFILE_FILE}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return res
    recorded = raw.get(HASH_FIELD)
    if not recorded:
        problems.append(f"{PROFILE_FILE}: no {HASH_FIELD} (written by an older emo-subset, or the field was "
                        "removed): rebuild the profile")
    elif recorded != manifest_hash(raw):
        problems.append(f"{PROFILE_FILE}: edited after it was written ({HASH_FIELD} differs)")
    if "config.json" not in man.files:
        problems.append("config.json: no sha256 recorded in profile.json")
    try:
        on_disk = shard_files(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{INDEX_NAME}: cannot be read ({type(e).__name__})")
        on_disk = []
    for f in sorted(set(on_disk) - set(man.shards)):
        problems.append(f"{f}: shard not listed in profile.json")
    for kind, table, out in (("shard", man.shards, shards), ("file", man.files, files)):
        for f, sha in sorted(table.items()):
            path = folder / f
            if Path(f).name != f or not path.is_file():
                problems.append(f"{f}: {kind} missing")
                out[f] = False
                continue
            try:
                ok = sha256_file(path) == sha
            except OSError as e:
                problems.append(f"{f}: cannot be read ({e.strerror})")
                out[f] = False
                continue
            out[f] = ok
            if not ok:
                problems.append(f"{f}: sha256 differs from profile.json")
            if on_file is not None:
                on_file(f, path.stat().st_size)
    return res
