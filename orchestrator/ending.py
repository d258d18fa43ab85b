"""How a life of the run ends, classified once, here.

A *life* is one start of every rank: the first start of a job, each in-allocation restart
(`launcher.max_restarts`) and each requeue. It ends in one of four classes:

- `finished`: trainer.max_steps reached (exit 0).
- `stopped`: a stop signal, every rank saved and the checkpoint committed (exit 75): requeue.
- `transient`: a rank died by a signal (OOM killer, segfault, kill -9), a peer was lost or hung
  past trainer.collective_timeout_s, storage stayed unreachable after its retries, or an
  exception not seen before at this step. Restarting from the newest commit may well succeed.
- `deterministic`: a config or usage error, a corrupt checkpoint with nothing to fall back to,
  or an exception that already ended an earlier life at the same step. A restart would only
  repeat it: the job stops at once with its one-line cause.

Each rank that can still speak writes its own record, `<run.dir>/lives/<life>/rank-NNNNN.json`
(class, cause, step, host), so `stockpot status` shows every life and a rank that fails can tell
whether the same failure ended an earlier life. It also writes its class word to
`$STOCKPOT_END_DIR/rank-NNNNN` when a supervisor (the local spawner, the Slurm batch script)
set that variable: the supervisor reads those words, and `worst` of them, to decide. A rank
killed by a signal writes nothing; its supervisor counts it transient.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.errors import StockpotError

if TYPE_CHECKING:
    from orchestrator.progress import Progress
    from orchestrator.storage import Store

log = logging.getLogger(__name__)

FINISHED, STOPPED, TRANSIENT, DETERMINISTIC = "finished", "stopped", "transient", "deterministic"
CLASSES = (FINISHED, STOPPED, TRANSIENT, DETERMINISTIC)  # in rising severity
LIVES_DIR = "lives"
# Set by a supervisor for the ranks it starts: which life this is, and where to say how it ended.
LIFE_ID_VAR, END_DIR_VAR = "STOCKPOT_LIFE_ID", "STOCKPOT_END_DIR"
STARTED_PREFIX = "started-"  # in the end dir: a rank past its life's first step

# The step the rank is at, for a failure's signature (the session points it at its Progress).
_where: list[Progress] = []


def watch(progress: Progress) -> None:
    """Called by the session: a failure from now on is placed at `progress.step`."""
    _where[:] = [progress]


def current_step() -> int | None:
    return _where[0].step if _where else None


@dataclass(frozen=True)
class EndRecord:
    """One rank's account of how its life ended (the JSON record, field for field)."""

    life: str
    rank: int
    klass: str
    cause: str
    step: int | None = None
    host: str = ""
    time: float = 0.0
    signature: str = ""  # type and message of an exception: what "the same failure" means
    world: int = 0  # ranks in the life: those without a record died without a word

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> EndRecord:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def signature(exc: BaseException) -> str:
    """What "the same failure" means: the exception's type and message, with the parts that
    change from one life to the next (numbers, hex ids: temp names, ports, addresses) blanked,
    so a repeat is seen as one."""
    text = " ".join(str(exc).split())[:300]
    text = re.sub(r"[0-9a-f]{8,}|\d+", "#", text)
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {text}"


def classify(
    exc: BaseException, step: int | None, earlier: Iterable[EndRecord], *, lost_peer: bool = False
) -> str:
    """The class of a rank's failure with `exc` at `step`, given the records of earlier lives.

    The exception's own `restart` (orchestrator/errors.py) decides first: "never" (config,
    usage, corruption with nothing older, a full disk) is deterministic, "always" (storage
    down after its retries) transient. A lost or hung peer says nothing about this rank's code:
    transient. Anything else is transient the first time and deterministic when the same
    failure ended an earlier life at the same step (at most one restart for a bug)."""
    policy = getattr(exc, "restart", "once")
    if policy == "never":
        return DETERMINISTIC
    if lost_peer or policy == "always":
        return TRANSIENT
    sig = signature(exc)
    for end in earlier:  # the caller leaves out this life's own records
        if end.signature == sig and end.step == step and end.klass != FINISHED:
            return DETERMINISTIC
    return TRANSIENT


def worst(classes: Iterable[str]) -> str:
    """The class of a life from its ranks' classes (a missing rank counts as TRANSIENT)."""
    ranked = [CLASSES.index(c) for c in classes if c in CLASSES]
    return CLASSES[max(ranked)] if ranked else TRANSIENT


def life_id(environ: Mapping[str, str], job_id: str | None, restart_count: int) -> str:
    """This life's name: a supervisor's, else one from the job (torchrun, plain srun)."""
    given = environ.get(LIFE_ID_VAR)
    if given:
        return given
    return f"{job_id or 'run'}-{restart_count}-0"


def record(store: Store | None, environ: Mapping[str, str], end: EndRecord) -> None:
    """Write this rank's record to the run dir (unless `store` is None), and its class word
    for a supervisor. Best effort: failing to record must not hide the failure it records."""
    end_dir = environ.get(END_DIR_VAR)
    if end_dir:
        try:
            with open(os.path.join(end_dir, f"rank-{end.rank:05d}"), "w") as f:
                f.write(f"{end.klass}\n{end.cause}\n")
        except OSError as exc:
            log.warning("could not tell the supervisor how rank %d ended: %s", end.rank, exc)
    if store is None:
        return
    try:
        store.write_bytes(f"{LIVES_DIR}/{end.life}/rank-{end.rank:05d}.json", end.to_json())
    except Exception as exc:  # the store may be what failed
        log.warning("could not record how rank %d ended in the run dir: %s", end.rank, exc)


def make_end(
    life: str,
    rank: int,
    klass: str,
    cause: str,
    exc: BaseException | None = None,
    *,
    world: int = 0,
) -> EndRecord:
    """A record of this rank's end now; `exc` is the failure's own exception (None for a
    finish, a stop or a lost peer, which have no signature to repeat)."""
    return EndRecord(
        life=life,
        rank=rank,
        klass=klass,
        cause=cause,
        step=current_step(),
        host=socket.gethostname(),
        time=round(time.time(), 3),
        signature=signature(exc) if exc is not None and klass != FINISHED else "",
        world=world,
    )


def read_ends(store: Store) -> list[EndRecord]:
    """Every rank record of the run, oldest first ([] without any)."""
    try:
        files = store.walk_files(LIVES_DIR)
    except (FileNotFoundError, StockpotError):
        return []
    ends = []
    for rel in files:
        if not rel.endswith(".json"):
            continue
        try:
            ends.append(EndRecord.from_json(store.read_bytes(f"{LIVES_DIR}/{rel}")))
        except (OSError, ValueError, TypeError):
            continue  # a record cut short: the rest still tell the story
    return sorted(ends, key=lambda e: (e.time, e.rank))


def lives(ends: Sequence[EndRecord]) -> list[dict[str, Any]]:
    """One summary per life, oldest first: its class (the worst of its ranks'), the cause to
    show (a rank's own failure before the lost-peer lines it caused), step and ranks heard."""
    by_life: dict[str, list[EndRecord]] = {}
    for end in ends:
        by_life.setdefault(end.life, []).append(end)
    out = []
    for life, group in sorted(by_life.items(), key=lambda kv: min(e.time for e in kv[1])):
        klass = worst(e.klass for e in group)
        own = [e for e in group if e.signature]  # not a lost peer: the cause itself
        show = sorted(own or group, key=lambda e: (-CLASSES.index(e.klass), e.rank))[0]
        cause = show.cause
        silent = sorted(set(range(max(e.world for e in group))) - {e.rank for e in group})
        if silent and not own and klass == TRANSIENT:
            cause = (f"rank(s) {', '.join(map(str, silent))} left no record (killed by a signal "
                     f"or their node lost); {cause}")  # fmt: skip
        steps = [e.step for e in group if e.step is not None]
        out.append({
            "life": life,
            "class": klass,
            "cause": cause,
            "step": max(steps) if steps else None,
            "ranks": sorted(e.rank for e in group),
            "time": max(e.time for e in group),
        })  # fmt: skip
    return out


def mark_started(environ: Mapping[str, str], rank: int) -> None:
    """Tell a supervisor this rank trained its life's first step (`started-NNNNN` in its end
    dir): the start-up is over, so what the supervisor does next (launch/standby.py) no longer
    competes with it. Best effort, like `record`."""
    end_dir = environ.get(END_DIR_VAR)
    if end_dir:
        try:
            open(os.path.join(end_dir, f"{STARTED_PREFIX}{rank:05d}"), "w").close()
        except OSError as exc:
            log.warning("could not tell the supervisor rank %d started: %s", rank, exc)


def started_ranks(end_dir: str) -> int:
    """How many ranks of the life that writes to `end_dir` trained their first step."""
    try:
        return sum(name.startswith(STARTED_PREFIX) for name in os.listdir(end_dir))
    except OSError:
        return 0


def life_class(words: Mapping[int, tuple[str, str]], nproc: int) -> str:
    """A life's class from the words its ranks left for their supervisor (rank -> class): a
    deterministic failure anywhere decides; finished or stopped needs every rank to say so;
    anything else (a rank silent because a signal killed it, a lost peer) is transient."""
    said = {klass for klass, _ in words.values()}
    if DETERMINISTIC in said:
        return DETERMINISTIC
    for whole in (FINISHED, STOPPED):
        if len(words) == nproc and said == {whole}:
            return whole
    return TRANSIENT


def read_words(end_dir: str) -> dict[int, tuple[str, str]]:
    """What the ranks left in a supervisor's end dir (`rank-NNNNN`: the class word, then the
    cause), by rank."""
    words = {}
    for name in os.listdir(end_dir):
        if name.startswith("rank-") and name[5:].isdigit():
            with open(os.path.join(end_dir, name)) as f:
                klass, _, cause = f.read().partition("\n")
            words[int(name[5:])] = (klass.strip(), cause.strip())
    return words
