"""`bench import --format F FILE`: a ResNet / ViT checkpoint of another tool, written once
as a native encoder (safetensors + card) that `--weights` then reads without the importer.

The conversion is `weights.encoder.import_foreign`'s, the one `--weights FILE` runs on the
fly, so a native file and the checkpoint it came from give the same features. The card
records the family, architecture and its config (enough to rebuild the network), the input
convention, the probe taps and the head input (`encoders.card_fields`), and where the
weights came from (format, source file, DINO branch, key counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.errors import BenchError, printable


def import_to_native(
    source: Path,
    out: Path,
    *,
    fmt: str | None = None,
    method: str | None = None,
    force: bool = False,
    **options: Any,
) -> Path:
    """Write `source`'s encoder as a native safetensors file (+ `<stem>.card.json`).

    `out` may be a folder, existing or not when it has no suffix (the file is then
    `encoder.safetensors` inside it, so the folder works as `--weights`). Nothing is
    replaced without `force`; what a killed import left beside the outputs is removed first.
    `options`: `weights.import_tree`'s family, branch, num_heads, input_convention.
    """
    from benchmark.runs import remove_stale_temporaries_of
    from weights.encoder import import_foreign
    from weights.native import NATIVE_FILE, card_path, write_native

    source, out = Path(source), Path(out)
    if out.is_dir() or not out.suffix:
        out = out / NATIVE_FILE
    if out.suffix != ".safetensors":
        raise BenchError(f"{printable(out)}: output must be a .safetensors file")
    if out.exists() and out.resolve() == source.resolve():
        raise BenchError(f"{printable(out)}: the output would replace the checkpoint it reads")
    for path in (out, card_path(out)):
        if (path.exists() or path.is_symlink()) and not force:
            raise BenchError(f"{printable(path)}: exists (pass --force to overwrite)")
        if path.is_dir():
            raise BenchError(f"{printable(path)}: is a folder; bench will not replace it")
        remove_stale_temporaries_of(path)
    encoder, card = import_foreign(source, fmt=fmt, method=method, **options)
    card["source"] = str(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return write_native(out, state, card)
