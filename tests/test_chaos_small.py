"""The chaos suite, small (`make chaos` runs it at scale): bad storage set-ups found by the
start-up check with one line naming the fix, a full disk during a save, and two real chaos
trials (a SIGKILL and a bad set-up through `stockpot run`) judged like the full suite's."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import MANUAL, Checkpointer
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, TMP_PREFIX, DiskFull
from orchestrator.storage import Store
from orchestrator.storage.check import StorageSetupError
from tests.runs import REPO

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)


def _setup_problem(url: str, env: dict[str, str]) -> tuple[int, str]:
    """Store(url).check_writable() in a fresh process (botocore reads credentials once per
    process): its exit code and what it printed (retry warnings go to stderr, not counted)."""
    code = (
        "import sys\nfrom orchestrator.storage import Store\n"
        "from orchestrator.storage.check import StorageSetupError\n"
        f"try:\n    Store({url!r}).check_writable()\n"
        "except StorageSetupError as e:\n    print(e); sys.exit(e.exit_code)\n"
    )
    full = {k: v for k, v in {**os.environ, **env}.items() if v}
    out = subprocess.run([sys.executable, "-c", code], env=full, cwd=REPO, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    return out.returncode, out.stdout


@root_only
def test_read_only_run_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    where = tmp_path / "ro"
    _mount(where, "size=1m,ro")
    try:
        with pytest.raises(StorageSetupError, match=r"is not writable .*choose a writable"):
            Store(str(where / "run")).check_writable()
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
    assert StorageSetupError.exit_code == 2


@pytest.mark.parametrize(
    ("case", "fix"),
    [
        ("no-credentials", "no S3 credentials found: set AWS_ACCESS_KEY_ID"),
        ("unknown-bucket", "does not exist: create it or fix run.dir"),
        ("unreachable", "unreachable (EndpointConnectionError"),
        ("forbidden-403", "access denied (403)"),
    ],
)
def test_bad_s3_setup_is_refused_in_one_line(case, fix, s3_server, s3_bucket, s3_faults) -> None:
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url}
    url = f"{s3_bucket}/run"
    if case == "no-credentials":
        env |= {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    elif case == "unknown-bucket":
        url = f"s3://no-such-{uuid.uuid4().hex[:8]}/run"
    elif case == "unreachable":
        env |= {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    else:
        s3_faults.fail("", status=403, times=None)
        env |= {"AWS_ENDPOINT_URL": s3_faults.endpoint_url}
    code, out = _setup_problem(url, env)
    assert code == 2, out
    assert fix in out and len(out.strip().splitlines()) == 1, out


class _Weights:
    def __init__(self) -> None:
        self.w = torch.arange(300_000, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"]


@root_only
def test_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    _mount(disk, "size=3m")
    try:
        store = Store(str(disk / "run"))
        ckpt = Checkpointer(store)
        ckpt.register("train", _Weights())
        ckpt.save(1)  # 1.2 MB: fits
        (disk / "filler").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * 4096 - 300_000))
        with pytest.raises(DiskFull, match=r"^no space left on device writing .*\.distcp$"):
            ckpt.save(2)
        scan = catalog.scan(store)
        assert [c.step for c in scan.committed] == [1]
        assert catalog.verify(store.child(scan.committed[0].rel), scan.committed[0].manifest) == []
        left = os.listdir(disk / "run" / CHECKPOINTS_DIR)
        assert not [n for n in left if n.startswith(TMP_PREFIX)], left
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_chaos_trials_kill_and_bad_setup(tmp_path: Path, s3_server) -> None:
    """Two trials of the real suite: a SIGKILL (then resume, bit-identical) and a bad set-up."""
    out = tmp_path / "chaos.json"
    args = ["--trials", "2", "--only", "kill", "setup", "--no-readme", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "bench.chaos", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["trials"], result["failures"]) == (2, 0)
    assert result["kills"] == 1 and result["faults"] == 1


def test_resume_past_a_damaged_checkpoint_saves_that_step_again(tmp_path: Path) -> None:
    """The restore falls back past a damaged step 2 (leaving it to inspect); saving step 2
    again replaces it instead of failing on an "already committed" directory."""
    store = Store(str(tmp_path / "run"))
    first = Checkpointer(store)
    first.register("train", _Weights())
    first.save(1)
    first.save(2)
    shard = next((tmp_path / "run" / CHECKPOINTS_DIR / "step-000000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    again = Checkpointer(store)
    again.register("train", _Weights())
    info = again.restore()
    assert info is not None and info.step == 1
    assert [c.step for c in catalog.scan(store).committed] == [1, 2]  # still there to look at
    again.save(2)
    scan = catalog.scan(store)
    assert [c.step for c in scan.committed] == [1, 2]
    assert catalog.verify(store.child(scan.committed[1].rel), scan.committed[1].manifest) == []


def test_garbage_metadata_of_the_right_size_is_caught_with_checksums_off(tmp_path: Path) -> None:
    """Checksums off skips hashing the shards, never the small files something parses whole:
    a `.metadata` of random bytes is found before DCP unpickles it, and the restore falls back."""
    store = Store(str(tmp_path / "run"))
    first = Checkpointer(store)
    first.register("train", _Weights())
    first.save(1)
    first.save(2)
    metadata = tmp_path / "run" / CHECKPOINTS_DIR / "step-000000002" / ".metadata"
    metadata.write_bytes(os.urandom(metadata.stat().st_size))
    again = Checkpointer(store, config=dataclasses.replace(MANUAL, verify_checksums=False))
    again.register("train", _Weights())
    info = again.restore()
    assert info is not None and info.step == 1


@pytest.mark.parametrize(
    "gloo",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer [::1]:29500",
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms",
        # What DDP's backward allreduce raised in a `make chaos` hang trial (SIGSTOPped peer).
        "Application timeout caused pair closure",
    ],
)
def test_what_gloo_says_of_a_lost_peer_reads_as_one_line(gloo: str) -> None:
    """The messages gloo raises when the other rank died or hung become one line naming it;
    any other RuntimeError stays a traceback (worker.run_rank re-raises it)."""
    import socket

    from orchestrator import dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init("gloo", 0, 1, "127.0.0.1", port, timeout_s=30)
    try:
        line = dist.lost_peer(RuntimeError(gloo))
        other = dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    finally:
        dist.teardown()
    assert line is not None and line.startswith("rank 0: a collective failed: another rank")
    assert "collective_timeout_s" in line and "\n" not in line
    assert other is None
