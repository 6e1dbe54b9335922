"""What a slice skipped and what it produced: report.json, summary.json and the lines people read."""

from __future__ import annotations

import json
import math
from typing import Any

from data_prep.errors import TooManyBadInputs


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def bad_limit(total: int, max_fraction: float) -> int:
    """The most bad inputs a slice of `total` may have (more fails the job)."""
    return math.floor(max_fraction * total + 1e-9)


def check_bad(
    bad: list[tuple[str, str]], total: int, max_fraction: float, where: str, report_path: str | None = None
) -> None:
    """Raise TooManyBadInputs naming a few of the bad inputs when there are more than allowed."""
    if len(bad) <= bad_limit(total, max_fraction):
        return
    shown = "\n".join(f"  {key}: {reason}" for key, reason in bad[:10])
    more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
    listing = f" (full list: {report_path})" if report_path else ""
    raise TooManyBadInputs(
        f"{where}: {len(bad)} of {total} inputs could not be used, more than --max-bad-fraction "
        f"{max_fraction} allows{listing}:\n{shown}{more}"
    )


NOTE_KINDS = ("upscaled", "extreme aspect")  # the first words of data_prep.images.ImageChecks' notes


def make_report(name: str, total: int, bad: list[tuple[str, str]], notes=()) -> dict[str, Any]:
    """report.json of a slice: skipped inputs with the reason, kept images with notes, and counts."""
    noted = {kind.replace(" ", "_"): sum(note.startswith(kind) for _, note in notes) for kind in NOTE_KINDS}
    return {
        "slice": name,
        "inputs": total,
        "skipped": len(bad),
        "noted": noted,
        "skipped_inputs": [{"path": key, "reason": reason} for key, reason in bad],
        "noted_inputs": [{"path": key, "note": note} for key, note in notes],
    }


def summary_line(s: dict[str, Any]) -> str:
    noted = "".join(f", {s[k]} {k.replace('_', ' ')}" for k in ("upscaled", "extreme_aspect") if s.get(k))
    kept = (
        f" (images kept: {human_bytes(s['image_bytes'] / max(s['num_samples'], 1))} per image)"
        if s.get("image_bytes")
        else ""
    )
    return (
        f"{s['slice']}: {s['num_samples']} images, {s['skipped']} skipped{noted}, {s['shards']} shards, "
        f"{human_bytes(s['bytes'])}{kept}, {s['elapsed_s']:.1f} s, {s['images_per_s']:.1f} images/s"
    )


def to_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
