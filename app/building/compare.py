"""Comparing a new model with the one in service, on the same photos, the way the server runs both.

NEW is *as good as* OLD when it gets at least as many of the labelled photos right and, when photos
of no class are given and both models have a detector, flags at least as many of them. The report
sets both models' figures side by side and lists the photos on which they disagree (another class,
or another `unfamiliar` verdict); `contact_sheet` draws those photos in one image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from app.core.images import ImageError, decode_image

AS_GOOD = ("NEW is as good as OLD when it gets at least as many labelled photos right and, given photos of no "
           "class and a detector in both, flags at least as many of them")
SHEET_COLUMNS = 6
SHEET_TILE = 160
SHEET_MOST = 60


def flagged_unfamiliar(report: dict[str, Any]) -> int | None:
    other = report.get("flagged_unfamiliar")
    return other["overall"]["flagged"] if other else None


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Both `app.building.measure.evaluate` reports side by side, the photos they disagree on, and
    the verdict."""
    old_by_file = {row["file"]: row for row in old["photos"]}
    disagreements = [
        {"file": row["file"], "actual": row["actual"], "old": old_by_file[row["file"]]["predicted"],
         "new": row["predicted"], "old_unfamiliar": old_by_file[row["file"]]["unfamiliar"],
         "new_unfamiliar": row["unfamiliar"]}
        for row in new["photos"] if row["file"] in old_by_file
        and (row["predicted"], row["unfamiliar"]) != (old_by_file[row["file"]]["predicted"],
                                                     old_by_file[row["file"]]["unfamiliar"])]
    right = {name: report["images"] - report["errors"] for name, report in (("new", new), ("old", old))}
    flagged = {"new": flagged_unfamiliar(new), "old": flagged_unfamiliar(old)}
    new_flagged, old_flagged = flagged["new"], flagged["old"]
    flags_as_many = new_flagged is None or old_flagged is None or new_flagged >= old_flagged
    as_good = right["new"] >= right["old"] and flags_as_many
    return {"new": new, "old": old, "right": right, "flagged_unfamiliar": flagged,
            "disagreements": disagreements, "as_good": as_good, "rule": AS_GOOD}


def format_comparison(result: dict[str, Any]) -> str:
    new, old = result["new"], result["old"]
    lines = [f"{'':<28} {'OLD':>10} {'NEW':>10}",
             f"{'accuracy':<28} {old['accuracy']:>10.2%} {new['accuracy']:>10.2%}",
             f"{'right (of ' + str(new['images']) + ')':<28} {result['right']['old']:>10} {result['right']['new']:>10}"]
    if new.get("flagged_known") and old.get("flagged_known"):
        lines.append(f"{'real photos flagged':<28} {old['flagged_known']['overall']['rate']:>10.1%} "
                     f"{new['flagged_known']['overall']['rate']:>10.1%}")
    if None not in result["flagged_unfamiliar"].values():
        lines.append(f"{'photos of no class flagged':<28} {result['flagged_unfamiliar']['old']:>10} "
                     f"{result['flagged_unfamiliar']['new']:>10}")
    for name, report in (("OLD", old), ("NEW", new)):
        lines += ["", f"{name} confusion matrix (rows actual, columns predicted: {', '.join(report['classes'])})"]
        matrix = report["confusion_matrix"]["rows_actual_cols_predicted"]
        lines += ["  " + " ".join(f"{n:>6}" for n in row) for row in matrix]
    lines += ["", f"{len(result['disagreements'])} photos answered differently:"]
    for row in result["disagreements"][:40]:
        lines.append(f"  {row['file']}: actual {row['actual']}; OLD {row['old']}"
                     f"{' (unfamiliar)' if row['old_unfamiliar'] else ''}, NEW {row['new']}"
                     f"{' (unfamiliar)' if row['new_unfamiliar'] else ''}")
    verdict = "is" if result["as_good"] else "is NOT"
    lines += ["", f"NEW {verdict} as good as OLD ({result['rule']})"]
    return "\n".join(lines)


def contact_sheet(disagreements: list[dict[str, Any]], path: Path) -> int:
    """The photos the models disagree on (at most SHEET_MOST), captioned, in one PNG; how many."""
    rows = disagreements[:SHEET_MOST]
    columns = max(1, min(SHEET_COLUMNS, len(rows)))
    height = SHEET_TILE + 34
    sheet = Image.new("RGB", (columns * SHEET_TILE, max(1, -(-len(rows) // columns)) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        x, y = (i % columns) * SHEET_TILE, (i // columns) * height
        try:
            photo = decode_image(Path(row["file"]).read_bytes(), draft_size=(2 * SHEET_TILE, 2 * SHEET_TILE))
            photo.thumbnail((SHEET_TILE - 4, SHEET_TILE - 4))
            sheet.paste(photo, (x + 2, y + 2))
        except (ImageError, OSError):
            pass
        draw.text((x + 3, y + SHEET_TILE + 1), f"is {row['actual']}", fill="black")
        draw.text((x + 3, y + SHEET_TILE + 16), f"{row['old']} -> {row['new']}", fill="black")
    sheet.save(path)
    return len(rows)
