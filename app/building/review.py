"""The decisions of `python -m app.clean`'s review: keep, reject or move photos, most suspicious first.

Photos only ever move inside DATA, by rename, never over another file; rejected photos go to
DATA/_rejected/CLASS/ (which `app.train` skips); nothing is deleted. Requests name photos by their
number in the listing, never by path. Every decision is appended to DATA/.clean-log.jsonl as it
happens (one JSON object a line), so a restarted review shows what was decided and can still undo.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.building.datasets import REJECTED_DIR
from app.building.ranking import OUTLIER_Z, Ranking
from app.core.errors import DomainError

LOG_NAME = ".clean-log.jsonl"


class ReviewError(DomainError):
    """A decision that cannot be made. Codes: `bad_id`, `no_such_photo`, `bad_action`,
    `not_a_class`, `same_folder`, `outside_data`, `photo_gone`, `nothing_to_undo`."""


@dataclass
class Item:
    id: int
    file: str  # where the photo is now, relative to DATA
    label: str  # its class folder when it was scored
    predicted: str
    predicted_prob: float | None
    score: float | None
    reason: str
    sha256: str
    flagged: bool = False  # mislabeled or out of place by the ranking's verdicts (not by score alone)
    decision: str | None = None  # "keep", "reject" or "move", once decided
    moved_to: str | None = None  # the class a "move" went to

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


def free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `name-1`, `name-2`... if taken: a move never replaces a file."""
    target = folder / name
    stem, suffix = os.path.splitext(name)
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    return target


def move_inside(data: Path, source: Path, folder: Path, name: str | None = None) -> Path:
    """Move `source` into `folder` (both inside `data`), as `name` (default: its own), without
    ever overwriting: a hard link that fails if the name is taken, then the old name removed (a
    plain rename where the file system has no hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (source, folder):
        if not path.resolve().is_relative_to(data):
            raise ReviewError("outside_data", "Photos only move inside the data folder.")
    while True:
        target = free_name(folder, name or source.name)
        try:
            os.link(source, target)
        except FileExistsError:
            continue  # taken meanwhile: try the next name
        except OSError:
            os.rename(source, target)
            return target
        os.unlink(source)
        return target


class Review:
    """The listing and the decisions, replayed from the log on start."""

    def __init__(self, data: Path, ranking: Ranking):
        self.data = data.resolve()
        self.classes = ranking.classes
        self.log_path = self.data / LOG_NAME
        self.items: list[Item] = []
        for name in ranking.undecodable:
            self._add(name, name.split("/")[0], "", None, 1.0, "does not decode", "", flagged=True)
        for s in ranking.suspects:
            self._add(s.file, s.label, s.predicted, s.predicted_prob, s.score, s.reason, s.sha256,
                      flagged=s.label_issue or s.outlier >= OUTLIER_Z)
        self.undo_stack: list[dict[str, Any]] = []
        self._replay()

    def _add(self, file: str, label: str, predicted: str, prob: float | None, score: float | None, reason: str,
             sha256: str, flagged: bool = False) -> Item:
        item = Item(len(self.items), file, label, predicted, prob, score, reason, sha256, flagged)
        self.items.append(item)
        return item

    # --- The log ---------------------------------------------------------------------------------

    def _replay(self) -> None:
        effective: list[dict[str, Any]] = []
        for entry in self._read_log():
            if entry.get("action") == "undo":
                if effective:
                    effective.pop()
            else:
                effective.append(entry)
        by_file = {item.file: item for item in self.items}
        for index, entry in enumerate(effective):
            # Where this entry's photo is now: after its own move and any later ones.
            now = entry.get("to") or entry.get("file")
            for later in effective[index + 1:]:
                if later.get("from") == now:
                    now = later["to"]
            item = by_file.get(now)
            if item is None and entry.get("action") == "reject":
                # Rejected in an earlier run: no longer in a class folder, so not scored; listed as decided.
                item = self._add(now, Path(entry["from"]).parts[0], "", None, None, "rejected in an earlier review",
                                 entry.get("sha256", ""))
                by_file[now] = item
            if item is None:
                continue  # a photo moved or removed by hand since: nothing to show or undo
            self._mark(item, entry)
            self.undo_stack.append({**entry, "id": item.id})

    def _read_log(self) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a half-written last line after a crash
        return entries

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _mark(item: Item, entry: dict[str, Any] | None) -> None:
        """Show the decision `entry` records (none: undecided)."""
        item.decision = entry["action"] if entry else None
        item.moved_to = entry.get("class") if entry else None

    # --- Decisions -------------------------------------------------------------------------------

    def item(self, item_id: Any) -> Item:
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            raise ReviewError("bad_id", "Name a photo by its number in the listing.")
        if not 0 <= item_id < len(self.items):
            raise ReviewError("no_such_photo", f"There is no photo number {item_id} in the listing.")
        return self.items[item_id]

    def decide(self, item: Item, action: str, target_class: str | None = None) -> Item:
        source = self.data / item.file
        if action == "keep":
            entry: dict[str, Any] = {"action": "keep", "file": item.file, "sha256": item.sha256}
        elif action in ("reject", "move"):
            if action == "move" and target_class not in self.classes:
                raise ReviewError("not_a_class", f"Move to one of: {', '.join(self.classes)}.")
            if not source.is_file():
                raise ReviewError("photo_gone", f"{item.file} is no longer in the data folder.")
            # Rejected photos go to _rejected/<the class folder they are in now>.
            current = Path(item.file).parts[0]
            origin = current if current in self.classes else item.label
            folder = self.data / REJECTED_DIR / origin if action == "reject" else self.data / target_class
            if folder == source.parent:
                raise ReviewError("same_folder", f"{item.file} is already in {folder.name}.")
            target = move_inside(self.data, source, folder)
            entry = {"action": action, "from": item.file, "to": target.relative_to(self.data).as_posix(),
                     "sha256": item.sha256}
            if action == "move":
                entry["class"] = target_class
        else:
            raise ReviewError("bad_action", "The action is keep, reject or move.")
        self._write(entry)
        self._mark(item, entry)
        item.file = entry.get("to", item.file)
        self.undo_stack.append({**entry, "id": item.id})
        return item

    def undo(self) -> Item:
        """Take back the last decision: the photo goes back where it was (under another name if
        its old one has been taken since) and shows the decision it had before, if any."""
        if not self.undo_stack:
            raise ReviewError("nothing_to_undo", "There is nothing to undo.")
        entry = self.undo_stack[-1]
        item = self.items[entry["id"]]
        record: dict[str, Any] = {"action": "undo", "of": entry["action"], "file": item.file}
        if entry.get("to"):
            current = self.data / item.file
            if not current.is_file():
                raise ReviewError("photo_gone", f"{item.file} is no longer in the data folder.")
            original = self.data / entry["from"]
            back = move_inside(self.data, current, original.parent, original.name)
            item.file = back.relative_to(self.data).as_posix()
            record["back"] = item.file
        self._write(record)
        self.undo_stack.pop()
        before = [e for e in self.undo_stack if e["id"] == item.id]
        self._mark(item, before[-1] if before else None)
        return item

    def progress(self) -> dict[str, int]:
        decisions = [item.decision for item in self.items]
        return {"reviewed": sum(d is not None for d in decisions), "total": len(self.items),
                "flagged": sum(item.flagged for item in self.items),
                "kept": decisions.count("keep"), "moved": decisions.count("move"),
                "rejected": decisions.count("reject")}
