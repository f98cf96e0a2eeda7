"""Crash safety of `emo-subset` writes (issue 12, item 6): real `emo-subset` processes killed with
SIGKILL at the moments that matter (the `EMO_CRASH_AT` hook kills the process from inside, which no
cleanup survives), and disk full made real: a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG)
and, where this user may mount one, a small tmpfs (ENOSPC)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modeling import ProfileManifest
from modeling.io.safetensors_io import AtomicFolder, recover
from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    base = write_checkpoint_dir(root / "base", emo_config(), seed=3)
    corpus = write_domain_corpus(root / "corpus.jsonl")
    return root, base, corpus


def subset(*args, crash: str | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("EMO_CRASH_AT", None)
    if crash:
        env["EMO_CRASH_AT"] = crash

    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "subsetting.cli", *map(str, args), "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def build(*args) -> int:
    """A build that is not meant to crash: in this process (the crash-safety code is the same)."""
    from subsetting.cli import main

    return main([str(a) for a in args] + ["-q"])


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def kept(profile: Path) -> int:
    return len(ProfileManifest.read(profile).kept_experts[0])


def test_a_build_killed_before_its_rename_leaves_a_temp_folder_that_the_next_build_removes(env, tmp_path):
    _, base, _ = env
    p = subset("build", base, "--out", tmp_path / "a", "--keep", 4, "--method", "random", crash="before-rename")
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(".a.tmp-") and not (tmp_path / "a").exists()
    # a later build, of another profile in the same folder, removes what the dead one left
    p = subset("build", base, "--out", tmp_path / "b", "--keep", 4, "--method", "random")
    assert p.returncode == 0, p.stderr
    assert hidden(tmp_path) == [] and "left by a writer that died" in p.stderr  # and says so
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b"]


def test_a_temp_folder_being_written_is_left_alone(env, tmp_path):
    """A folder whose writer is alive (it holds the lock) is not stale, whatever its age."""
    with AtomicFolder(tmp_path / "live") as tmp:
        (tmp / "config.json").write_text("{}")
        p = subprocess.run([sys.executable, "-c", "import sys; from modeling.io.safetensors_io import recover; "
                            "print(recover(sys.argv[1]))", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.stdout.strip() == "[]" and tmp.is_dir(), p.stderr
    assert (tmp_path / "live" / "config.json").is_file() and hidden(tmp_path) == []
    assert hidden(tmp_path / "live") == []  # the marker does not reach the final folder


def test_force_killed_between_its_renames_is_restored_then_finished(env, tmp_path):
    _, base, _ = env
    out = tmp_path / "p"
    assert build("build", base, "--out", out, "--keep", 4, "--method", "random") == 0
    p = subset("build", base, "--out", out, "--keep", 5, "--method", "random", "--force", crash="between-renames")
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = hidden(tmp_path)
    assert not out.exists() and any(x.startswith(".p.old-") for x in left) and any(x.startswith(".p.tmp-") for x in left)
    # any later build in the folder puts the old profile back first ...
    assert build("build", base, "--out", tmp_path / "q", "--keep", 4, "--method", "random") == 0
    assert kept(out) == 4 and hidden(tmp_path) == []
    assert build("verify", out) == 0
    # ... and the replacement, run again, finishes
    assert build("build", base, "--out", out, "--keep", 5, "--method", "random", "--force") == 0
    assert kept(out) == 5 and hidden(tmp_path) == []


def test_force_killed_after_its_renames_leaves_an_old_folder_the_next_build_removes(env, tmp_path):
    _, base, _ = env
    out = tmp_path / "p"
    assert build("build", base, "--out", out, "--keep", 4, "--method", "random") == 0
    p = subset("build", base, "--out", out, "--keep", 5, "--method", "random", "--force", crash="after-renames")
    assert p.returncode == -signal.SIGKILL
    assert kept(out) == 5 and any(x.startswith(".p.old-") for x in hidden(tmp_path))
    assert build("build", base, "--out", tmp_path / "q", "--keep", 4, "--method", "random") == 0
    assert kept(out) == 5 and hidden(tmp_path) == []


def test_recover_touches_only_its_own_shapes(tmp_path):
    """A user's hidden folders that merely look alike stay: no marker, no checkpoint inside."""
    for name in (".notes.tmp-12-abc", ".cfg.old-99", ".x.tmp-1-y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("keep me")
    assert recover(tmp_path) == []
    assert len(hidden(tmp_path)) == 3


# -- disk full ---------------------------------------------------------------------------------


def test_file_size_limit_mid_build_leaves_no_temp_and_no_created_parents(env, tmp_path):
    _, base, _ = env
    out = tmp_path / "new" / "deeper" / "p"
    p = subset("build", base, "--out", out, "--keep", 4, "--method", "random", fsize=20_000)
    assert p.returncode == 2 and "File too large" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_in_fingerprint_leaves_no_partial_npz(env, tmp_path):
    _, base, corpus = env
    out = tmp_path / "new" / "calib.npz"
    p = subset("fingerprint", base, corpus, "--out", out, fsize=2_000)
    assert p.returncode == 2 and "File too large" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []
    # with room it works, through the same path
    assert build("fingerprint", base, corpus, "--out", out) == 0
    assert sorted(x.name for x in out.parent.iterdir()) == ["calib.npz"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests cover disk full")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_filesystem_mid_build_leaves_nothing(env, small_tmpfs):
    _, base, _ = env
    out = small_tmpfs / "new" / "p"
    p = subset("build", base, "--out", out, "--keep", 4, "--method", "random")
    assert p.returncode == 2 and "No space left" in p.stderr, p.stderr
    assert list(small_tmpfs.iterdir()) == []
