"""The inpainting generator from its weights file (read and written by `weights.generator`).

The card records the hole geometry the generator was
trained with (`hole`, `overlap`); cards written before `hole` existed mean "code".
Generators trained before bench dropped the first conv's bias (the released network has
none) still load, with that bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.errors import BenchError, printable
from pretrain.inpainting.model import HOLE_MODES, OVERLAPS, ContextEncoderGenerator, HoleGeometry
from pretrain.losses import OVERLAP_PAPER
from weights.generator import read_generator

BOTTLENECK_KEY = "encoder.net.14.weight"  # (bottleneck, 512, 4, 4)
CONV1_BIAS_KEY = "encoder.net.0.bias"


def card_geometry(
    card: dict[str, Any] | None, hole: str | None = None, overlap: int | None = None
) -> HoleGeometry:
    """The hole geometry to use with a generator card (None: no generator, the paper's
    geometry), `hole` / `overlap` overriding it where given. A card without `hole` (written
    before it existed) is "code", without `overlap` 7 (bench's default then). `hole` alone
    takes that geometry's own overlap; `overlap` alone must be the hole's own, since an
    overlap that mixes the two geometries needs `hole` given too."""
    if card is None:
        card = {"hole": "paper", "overlap": OVERLAPS["paper"]}
    mode = hole if hole is not None else str(card.get("hole", "code"))
    if mode not in HOLE_MODES:
        raise BenchError(f"hole: {printable(mode)} is not one of {', '.join(HOLE_MODES)}")
    if overlap is not None:
        if hole is None and overlap not in (OVERLAPS[mode], card.get("overlap")):
            raise BenchError(
                f"overlap: {overlap} px with the generator's {mode} hole (whose own overlap is "
                f"{OVERLAPS[mode]} px) mixes two geometries; give hole too to evaluate it so"
            )
        ov = overlap
    elif hole is not None:
        ov = OVERLAPS[mode]
    else:
        ov = int(card.get("overlap", OVERLAP_PAPER))
    try:
        return HoleGeometry(mode, ov)  # type: ignore[arg-type]
    except ValueError as exc:
        raise BenchError(f"generator card: {exc}") from None


def load_generator(
    weights: str | Path, geometry: HoleGeometry | None = None
) -> tuple[ContextEncoderGenerator, dict[str, Any]]:
    """(generator in eval mode on CPU, card) from a run folder or generator file. The
    generator outputs the prediction box of `geometry` (default: the card's)."""
    path, state, card = read_generator(weights)
    code = state.get(BOTTLENECK_KEY)
    if code is None:
        raise BenchError(f"{printable(path)}: not an inpainting generator (no {BOTTLENECK_KEY})")
    geometry = geometry or card_geometry(card)
    # Generators saved when bench gave the encoder's first conv a bias (the released one has
    # none) load as they were trained.
    conv1_bias = CONV1_BIAS_KEY in state
    net = ContextEncoderGenerator(code.shape[0], geometry.prediction.size, conv1_bias)
    expected = net.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [
        k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if bad:
        raise BenchError(f"{printable(path)}: not an inpainting generator (key {bad[0]!r})")
    net.load_state_dict(state)
    return net.eval(), card
