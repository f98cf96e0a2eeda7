#!/usr/bin/env python3
"""Build the emo-serve image with podman, from the packages this machine's pip reaches.

    python3 deploy/build_image.py                       # emo-serve:latest (what `make image` runs)
    python3 deploy/build_image.py --base python:3.11-slim-bookworm --tag emo-serve:cpu

The Dockerfile is generic (public Python base, PyPI and PyPI's torch index). On a
machine with no image registry and a local package mirror this script supplies the
two things the build cannot find by itself, without committing them to the
repository or baking them into the image:

- **The base image.** `--base auto` (the default) uses `localhost/debian-base:<suite>`,
  making it first with `mmdebstrap` (Debian minbase + python3, python3-venv,
  ca-certificates; about 225 MB) and `podman import` when it is missing; without
  mmdebstrap it leaves the Dockerfile's default.
- **pip's sources.** `pip config list` gives this machine's settings (its config
  files and `PIP_*` variables: index URLs, find-links, constraints, certificate).
  They are merged into one pip.conf in a temporary folder, and that file, every
  local folder or file they name (`file://` indexes, wheel folders, the constraints
  file, the CA bundle; for a `file://` index the folder above it, whose files its
  pages link to) are bind-mounted read-only into each `RUN` step at the
  same paths (`podman build -v`). Mounts are not layers: nothing of them stays in
  the image. With a local source, torch comes from pip's sources too
  (`TORCH_INDEX=`, as `make setup` installs it) rather than PyPI's torch index.

Run as root (mmdebstrap and podman here are rootful). Exits with podman's status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAG = "emo-serve:latest"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """This machine's pip settings as `pip config list` shows them; a PIP_* variable beats a file."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            env[name] = value
        elif section in ("global", "install"):
            files[name] = value
    return {**files, **env}


def local_paths(settings: dict[str, str]) -> list[Path]:
    """Existing files and folders named by the settings (paths and file:// URLs), without duplicates.

    A local index's pages link to files beside it (`simple/x/index.html` -> `../../files/x.whl`):
    for an index URL the folder above it is the one to mount."""
    paths: list[Path] = []
    for key, value in settings.items():
        for token in value.split():
            p = Path(token[len("file://"):] if token.startswith("file://") else token)
            if key.endswith("index-url"):
                p = p.parent
            if p.is_absolute() and p.exists() and not any(p == q or q in p.parents for q in paths):
                paths.append(p)
    return paths


def pip_build_args(settings: dict[str, str], workdir: Path) -> list[str]:
    """`podman build` arguments that give every RUN step this machine's pip sources, read-only."""
    if not settings:
        return []
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    args = ["--volume", f"{conf}:/etc/pip.conf:ro"]
    for p in local_paths(settings):
        args += ["--volume", f"{p}:{p}:ro"]
    if any(p.is_dir() for p in local_paths(settings)):  # a local mirror: torch from it, as `make setup` does
        args += ["--build-arg", "TORCH_INDEX="]
    return args


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref]).returncode == 0


def apt_option(name: str) -> str | None:
    """A host apt setting (e.g. a mirror of dated snapshots needs Acquire::Check-Valid-Until false)."""
    if not shutil.which("apt-config"):
        return None
    out = subprocess.run(["apt-config", "shell", "V", name], capture_output=True, text=True).stdout.strip()
    return out.split("=", 1)[1].strip("'") if out.startswith("V=") else None


def make_base(ref: str, suite: str) -> None:
    """A Debian minbase with python3 as a podman image, from the Debian mirror apt uses."""
    cmd = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}"]
    valid_until = apt_option("Acquire::Check-Valid-Until")
    if valid_until is not None:
        cmd.append(f'--aptopt=Acquire::Check-Valid-Until "{valid_until}"')
    with tempfile.TemporaryDirectory(prefix="emo-base-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        t0 = time.monotonic()
        subprocess.run([*cmd, suite, str(tar)], check=True)
        subprocess.run(["podman", "import", str(tar), ref], check=True, stdout=subprocess.DEVNULL)
    print(f"build_image: base {ref} made in {time.monotonic() - t0:.0f} s", file=sys.stderr)


def resolve_base(base: str, suite: str) -> str | None:
    """The base image to build on; None: the Dockerfile's default."""
    if base != "auto":
        return base
    local = f"localhost/debian-base:{suite}"
    if image_exists(local):
        return local
    if shutil.which("mmdebstrap"):
        make_base(local, suite)
        return local
    return None


def build(tag: str = DEFAULT_TAG, base: str = "auto", suite: str = "bookworm", torch_index: str | None = None,
          extra: list[str] | None = None, file: Path = ROOT / "Dockerfile", context: Path = ROOT) -> int:
    if not shutil.which("podman"):
        print("build_image: podman is not installed (make setup-system installs it)", file=sys.stderr)
        return 2
    base_ref = resolve_base(base, suite)
    with tempfile.TemporaryDirectory(prefix="emo-pip-") as tmp:
        cmd = ["podman", "build", "--format", "docker",  # docker format: OCI images drop HEALTHCHECK
               "--file", str(file), "--tag", tag]
        if base_ref:
            cmd += ["--build-arg", f"BASE_IMAGE={base_ref}"]
        cmd += pip_build_args(pip_settings(), Path(tmp))
        if torch_index is not None:
            cmd += ["--build-arg", f"TORCH_INDEX={torch_index}"]
        cmd += [*(extra or []), str(context)]
        print("build_image:", " ".join(cmd), file=sys.stderr)
        t0 = time.monotonic()
        rc = subprocess.run(cmd).returncode
        print(f"build_image: {tag} {'built' if rc == 0 else 'FAILED'} in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
        return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default=DEFAULT_TAG, help=f"image name (default {DEFAULT_TAG})")
    p.add_argument("--base", default="auto",
                   help="base image, or auto: localhost/debian-base:SUITE, made by mmdebstrap when missing")
    p.add_argument("--suite", default="bookworm", help="Debian suite of the auto base (default bookworm: Python 3.11)")
    p.add_argument("--torch-index", help="PyTorch wheel index (cpu, cu128, ...; empty: pip's sources). Default: "
                                         "the sources when this machine has a local mirror, else cpu")
    p.add_argument("--file", type=Path, default=ROOT / "Dockerfile",
                   help="Containerfile (default: the Dockerfile; deploy/compose/router.Containerfile: the router)")
    p.add_argument("--context", type=Path, help="build context (default: the repository, or the file's folder "
                                                "for another Containerfile)")
    p.add_argument("podman_args", nargs="*", help="more `podman build` arguments (after --)")
    args = p.parse_args(argv)
    context = args.context or (ROOT if args.file.resolve() == ROOT / "Dockerfile" else args.file.resolve().parent)
    return build(args.tag, args.base, args.suite, args.torch_index, args.podman_args, args.file, context)


if __name__ == "__main__":
    sys.exit(main())
