"""`profile.json`: the manifest of a profile folder (design.md, "A profile on disk").

The manifest format lives here, beside the loader, so that the server can read
profiles without importing the subset builder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .safetensors_io import INDEX_NAME, CheckpointFiles, DTYPE_NAMES
from .weights import PROFILE_FILE

FORMAT = "emo-serve-profile/1"


class ProfileError(ValueError):
    pass


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    shards: dict[str, str] = field(default_factory=dict)  # file -> sha256
    created: str = ""
    format: str = FORMAT

    def pool(self) -> dict[int, list[int]]:
        return {int(k): list(v) for k, v in self.kept_experts.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_experts"] = {str(k): v for k, v in sorted(self.kept_experts.items())}
        d["coverage"] = {str(k): v for k, v in sorted(self.coverage.items())}
        return d

    def write(self, folder: str | Path) -> Path:
        p = Path(folder) / PROFILE_FILE
        p.write_text(json.dumps(self.to_dict(), indent=1))
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
                created=str(d.get("created", "")),
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
