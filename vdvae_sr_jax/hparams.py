"""The official VDVAE grammar for layer and width strings, and how blocks group into scanned runs."""

from __future__ import annotations

import dataclasses
from collections import defaultdict


def parse_layer_string(s: str) -> list[tuple[int, int | None]]:
    """Parses `32x11,32d2,8m4,16` into (resolution, down_rate or mixin or None) per block."""
    layers: list[tuple[int, int | None]] = []
    for token in s.split(","):
        try:
            if "x" in token:
                res, count = token.split("x")
                layers += [(int(res), None)] * int(count)
            elif "m" in token:
                res, mixin = token.split("m")
                layers.append((int(res), int(mixin)))
            elif "d" in token:
                res, down = token.split("d")
                layers.append((int(res), int(down)))
            else:
                layers.append((int(token), None))
        except ValueError:
            raise ValueError(
                f"bad token {token!r} in layer string {s!r}: expected RxN, RdK, RmS or R with integers"
            ) from None
    return layers


def parse_width_string(width: int, s: str) -> dict[int, int]:
    """Parses `16:512,8:256` into a resolution -> width map whose default is `width`."""
    widths: dict[int, int] = defaultdict(lambda: width)
    if s:
        for token in s.split(","):
            try:
                res, w = token.split(":")
                widths[int(res)] = int(w)
            except ValueError:
                raise ValueError(f"bad token {token!r} in width string {s!r}: expected RES:WIDTH") from None
    return widths


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive identical blocks [start, stop) that share one scanned, stacked set of weights."""

    prefix: str
    start: int
    stop: int
    res: int
    extra: int | None  # down rate (encoder) or mixin resolution (decoder) of the run's first block
    stacked: bool = True  # False for an encoder down block, which changes shape and so is not scanned

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.start}_{self.stop - 1}" if self.stacked else f"{self.prefix}_{self.start}"

    @property
    def length(self) -> int:
        return self.stop - self.start


def encoder_runs(blocks: list[tuple[int, int | None]]) -> list[Run]:
    """Groups encoder blocks: each run of plain blocks at one resolution, and each down block alone."""
    runs: list[Run] = []
    for i, (res, down) in enumerate(blocks):
        last = runs[-1] if runs else None
        if down is None and last is not None and last.extra is None and last.res == res:
            runs[-1] = dataclasses.replace(last, stop=i + 1)
        else:
            runs.append(Run("enc_blocks", i, i + 1, res, down, stacked=down is None))
    return runs


def decoder_runs(blocks: list[tuple[int, int | None]]) -> list[Run]:
    """Groups decoder blocks: a run is all consecutive blocks at one resolution, a mixin only first."""
    runs: list[Run] = []
    for i, (res, mixin) in enumerate(blocks):
        last = runs[-1] if runs else None
        if mixin is None and last is not None and last.res == res:
            runs[-1] = dataclasses.replace(last, stop=i + 1)
        else:
            runs.append(Run("dec_blocks", i, i + 1, res, mixin))
    return runs
