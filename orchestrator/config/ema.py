"""`trainer.ema`'s decays: their check, and the checkpoint name each EMA is saved under.

Pure (no torch): the schema validates with it, `orchestrator.ema` names its state with it, and
an export or soup finds `ema_<digits>.model.<param>` keys by the same name.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.errors import require

EMA_PREFIX = "ema_"  # every EMA's state name starts so; `auto` prefixes pass them over
PLACES = 6  # decimals a decay may have: enough for 0.999999, and names stay short


def ema_name(decay: float) -> str:
    """The checkpoint state name of the EMA with `decay`: the digits after "0."
    (0.999 -> `ema_999`, 0.9995 -> `ema_9995`)."""
    return EMA_PREFIX + f"{decay:.{PLACES}f}".rstrip("0").removeprefix("0.")


def check_decays(decays: Sequence[float], key: str = "trainer.ema") -> None:
    """One-line ConfigError unless every decay is in (0, 1), has at most 6 decimals, and
    names a distinct EMA."""
    for d in decays:
        number = isinstance(d, int | float) and not isinstance(d, bool)
        require(
            number and 0 < d < 1, f"{key}: each decay must be in (0, 1), e.g. 0.999 (got {d!r})"
        )
        require(
            round(d, PLACES) == d,
            f"{key}: a decay has at most {PLACES} decimals (got {d!r}); round it",
        )
    names = [ema_name(d) for d in decays]
    twice = sorted({n for n in names if names.count(n) > 1})
    require(not twice, f"{key} lists a decay twice ({', '.join(twice)}); list each once")
