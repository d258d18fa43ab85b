"""S3 on a real endpoint (moto_server; a correctness server, not a speed reference): save
throughput against one s3fs `put_file` of the same bytes, and the HTTP requests a save and a
resume make, counted at a proxy (devtools/s3server.py's FaultProxy, forwarding everything);
and the same save through that proxy capped at 50 MB/s, a slow remote S3.

Requests are split per save by marks: after each save every rank meets at a barrier and rank 0
sends `GET /__bench_mark__/NAME` through the same proxy, so the log reads save | mark | save ...
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bench.common import Row, Sizes, median, ranks, ratio_row, run_cli
from devtools.s3server import FAKE_ENV, FaultProxy, make_bucket, start_moto_server, stop

MARK = "__bench_mark__"
CAP_MB_S = 50.0  # the capped proxy's link: a slow remote S3


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto_server process on a free port; yields its URL."""
    url, proc = start_moto_server(log)
    try:
        yield url
    finally:
        stop(proc)


def bucket_name(endpoint: str) -> str:
    """A fresh bucket's name (the bench's arguments take it bare, not as a URL)."""
    return make_bucket(endpoint, "bench").removeprefix("s3://")


# -- parent side -------------------------------------------------------------------------------


def _segments(requests: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The proxy's log cut at the marks: {mark name: the requests just before it}."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for method, path in requests:
        if f"/{MARK}/" in path:
            out[path.rsplit("/", 1)[1]] = current
            current = []
        else:
            current.append((method, path))
    return out


def _counts(reqs: list[tuple[str, str]]) -> tuple[int, int]:
    """(all requests, GETs of a manifest)."""
    return len(reqs), sum(1 for m, p in reqs if m == "GET" and "MANIFEST" in p)


def _requests(
    endpoint: str, work: Path, world: int, keeps: tuple[int, ...]
) -> dict[tuple[int, int], dict[str, tuple[int, int]]]:
    proxy = FaultProxy(upstream=endpoint).start()
    try:
        args = {"d_model": 32, "n_layers": 1, "keeps": keeps, "endpoint": proxy.endpoint_url,
                "bucket": bucket_name(endpoint), "work": str(work)}  # fmt: skip
        ranks("bench.worker", ["s3requests", json.dumps(args)], nproc=world, env=FAKE_ENV)
        seg = _segments(list(proxy.requests))
    finally:
        proxy.stop()
    return {(world, k): {"first": _counts(seg[f"{k}-save-1"]),
                         "steady": _counts(seg[f"{k}-save-{k + 2}"]),
                         "restore": _counts(seg[f"{k}-restore"])} for k in keeps}  # fmt: skip


def request_rows(endpoint: str, work: Path) -> list[Row]:
    """Saves should cost O(ranks) requests, not O(checkpoints kept); a resume should read each
    manifest once (the leader), not once per rank."""
    got = {**_requests(endpoint, work, 2, (2, 20)), **_requests(endpoint, work, 4, (2, 20))}

    def show(kind: str, i: int) -> str:
        return ", ".join(f"{w}r/{k}k {c[kind][i]}" for (w, k), c in got.items())

    save_flat = all(got[w, 20]["steady"][0] <= got[w, 2]["steady"][0] + 2 for w in (2, 4))
    once = all(c["restore"][1] <= k + 1 for (_, k), c in got.items())
    return [
        Row("S3 requests per save (steady state, retention on)", show("steady", 0),
            "O(ranks), not O(kept)", save_flat,
            note=f"first save {show('first', 0)}; manifest GETs per save {show('steady', 1)}"),
        Row("S3 requests per restore (Checkpointer.restore)", show("restore", 0),
            "manifests read once, by the leader", once,
            note=f"manifest GETs {show('restore', 1)}"),
    ]  # fmt: skip


def _run_args(bucket: str, endpoint: str, keep: int, nproc: int) -> list[str]:
    return ["run", "bench/charlm.yaml", f"run.dir=s3://{bucket}/run",
            f"storage.s3.endpoint_url={endpoint}", "task.d_model=32", "task.n_layers=1",
            f"trainer.max_steps={keep}", f"trainer.nproc={nproc}", "trainer.log_every=1",
            "checkpoint.every_steps=1", f"checkpoint.keep_last={keep}"]  # fmt: skip


def resume_request_row(endpoint: str, keep: int, worlds: tuple[int, ...]) -> Row:
    """A whole `stockpot run` resume (keep checkpoints on S3, nothing left to train), at each
    world size: every request it makes, and how many were manifest GETs."""
    bucket = bucket_name(endpoint)
    run_cli(_run_args(bucket, endpoint, keep, 2), env=FAKE_ENV)  # `keep` committed checkpoints
    proxy = FaultProxy(upstream=endpoint).start()
    got = {}
    try:
        for nproc in worlds:
            before = len(proxy.requests)
            run_cli(_run_args(bucket, proxy.endpoint_url, keep, nproc), env=FAKE_ENV)
            got[nproc] = _counts(list(proxy.requests)[before:])
    finally:
        proxy.stop()
    once = all(m <= keep + 1 for _, m in got.values())
    return Row(f"S3 requests per `stockpot run` resume, {keep} kept",
               ", ".join(f"{n}r {c[0]}" for n, c in got.items()),
               "manifests read once, by the leader", once,
               note="manifest GETs " + ", ".join(f"{n}r {c[1]}" for n, c in got.items()))  # fmt: skip


def _saves_and_puts(
    endpoint: str, sizes: Sizes, work: Path, via: str | None = None
) -> tuple[list[float], list[float], int]:
    """(save seconds, put_file seconds, bytes) of the interleaved repeats; `via`: the URL
    that the ranks talk to instead of `endpoint` (a capped proxy)."""
    args = {"d_model": 256, "n_layers": sizes.s3_layers, "repeats": sizes.repeats,
            "endpoint": via or endpoint, "bucket": bucket_name(endpoint),
            "work": str(work)}  # fmt: skip
    lines = ranks("bench.worker", ["s3save", json.dumps(args)], env=FAKE_ENV)
    save = [x["s"] for x in lines if x["variant"] == "save"]
    put = [x["s"] for x in lines if x["variant"] == "put"]
    return save, put, lines[0]["bytes"]


def _throughput_row(endpoint: str, sizes: Sizes, work: Path) -> Row:
    save, put, size = _saves_and_puts(endpoint, sizes, work)
    return ratio_row("S3 save throughput / one s3fs put_file",
                     median([p / s for p, s in zip(put, save, strict=True)]), ">= 0.9",
                     at_least=0.9, note=f"{size / 1e6:.0f} MB: save {size / median(save) / 1e6:.0f}"
                     f" MB/s, put_file {size / median(put) / 1e6:.0f} MB/s")  # fmt: skip


def capped_row(endpoint: str, sizes: Sizes, work: Path, mb_s: float = CAP_MB_S) -> Row:
    """The same save and put_file through a proxy capping the link at `mb_s` (both ranks
    share it, as a node's uplink): what a slow remote S3 costs, for a local tier to beat."""
    proxy = FaultProxy(upstream=endpoint, rate_mb_s=mb_s).start()
    try:
        save, put, size = _saves_and_puts(endpoint, sizes, work, via=proxy.endpoint_url)
    finally:
        proxy.stop()
    ratio = median([p / s for p, s in zip(put, save, strict=True)])
    return Row(f"S3 save through a {mb_s:g} MB/s link (s)", round(median(save), 2), "-", None,
               note=f"{size / 1e6:.0f} MB: the link alone {size / mb_s / 1e6:.2f} s, put_file "
               f"{median(put):.2f} s, put_file/save {ratio:.2f}")  # fmt: skip


def measure(sizes: Sizes, work: Path) -> list[Row]:
    os.environ.update(FAKE_ENV)  # for boto3 here and every rank
    with moto_server(work / "moto_server.log") as endpoint:
        rows = [_throughput_row(endpoint, sizes, work), capped_row(endpoint, sizes, work),
                *request_rows(endpoint, work)]  # fmt: skip
        return [*rows, resume_request_row(endpoint, sizes.s3_resume_kept, sizes.s3_resume_worlds)]
