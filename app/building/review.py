"""The decisions of `python -m app.clean`'s review: keep, reject or move photos, most suspicious first.

Photos only ever move inside DATA (and the feedback folder, with `--incoming`), by rename, never
over another file; rejected photos go to DATA/_rejected/CLASS/ (which `app.train` skips), photos of
none of the classes to DATA/_unfamiliar/; nothing is deleted. Requests name photos by their number
in the listing, never by path. Every decision is appended to DATA/.clean-log.jsonl as it happens
(one JSON object a line), so a restarted review shows what was decided and can still undo.

Corrections sent from the page (`--incoming FEEDBACK_DIR`, `app.core.feedback`) come first, named
`@incoming/NAME` in the listing and the log: "keep" accepts one into the class the parent chose,
"reject" moves it to FEEDBACK_DIR/_rejected/. Its record stays in FEEDBACK_DIR.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.building.datasets import REJECTED_DIR, UNFAMILIAR_DIR
from app.building.ranking import OUTLIER_Z, Ranking
from app.core.errors import DomainError
from app.core.feedback import NONE_OF_THESE, Correction, read_corrections
from app.core.files import sha256_file

LOG_NAME = ".clean-log.jsonl"
INCOMING = "@incoming/"  # how photos in the feedback folder are named in the listing and the log


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
    decision: str | None = None  # "keep", "accept", "reject", "move" or "unfamiliar", once decided
    moved_to: str | None = None  # the class a "move" or "accept" went to
    incoming: bool = False  # sent from the page: `label` is what the parent chose

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


def move_inside(roots: tuple[Path, ...], source: Path, folder: Path, name: str | None = None) -> Path:
    """Move `source` into `folder` (both inside one of `roots`), as `name` (default: its own),
    without ever overwriting: a hard link that fails if the name is taken, then the old name
    removed (a plain rename where the file system has no hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (source, folder):
        if not any(path.resolve().is_relative_to(root) for root in roots):
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

    def __init__(self, data: Path, ranking: Ranking, incoming: Path | None = None):
        self.data = data.resolve()
        self.incoming = incoming.resolve() if incoming is not None else None
        self.roots = (self.data,) if self.incoming is None else (self.data, self.incoming)
        self.classes = ranking.classes
        self.log_path = self.data / LOG_NAME
        self.items: list[Item] = []
        self.corrections = {c.photo: c for c in read_corrections(self.incoming, pending=False)} if incoming else {}
        for correction in self.corrections.values():
            if (self.incoming / correction.photo).is_file():
                self._add_correction(INCOMING + correction.photo, correction)
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

    def _add_correction(self, file: str, correction: Correction) -> Item:
        said = correction.label or NONE_OF_THESE
        unfamiliar = " and found it unlike its training photos" if correction.unfamiliar else ""
        reason = f"sent from the page on {correction.time[:10]}: the parent says {said}; the model said " \
                 f"{correction.answer}{unfamiliar}"
        path = self.path_of(file)
        item = self._add(file, said, correction.answer, float(correction.predictions[0][1]), None, reason,
                         sha256_file(path) if path.is_file() else "", flagged=True)
        item.incoming = True
        return item

    def path_of(self, file: str) -> Path:
        """Where a listed photo is on disk: `@incoming/...` in the feedback folder, the rest in DATA."""
        if file.startswith(INCOMING) and self.incoming is not None:
            return self.incoming / file.removeprefix(INCOMING)
        return self.data / file

    def name_of(self, path: Path) -> str:
        if self.incoming is not None and path.is_relative_to(self.incoming):
            return INCOMING + path.relative_to(self.incoming).as_posix()
        return path.relative_to(self.data).as_posix()

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
            source = entry.get("from", "")
            correction = self.corrections.get(source.removeprefix(INCOMING)) if source.startswith(INCOMING) else None
            if item is None and correction is not None and self.path_of(now).is_file():
                item = by_file[now] = self._add_correction(now, correction)
            elif item is not None and correction is not None:
                item.incoming, item.label = True, correction.label or NONE_OF_THESE  # accepted in an earlier run
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
        source = self.path_of(item.file)
        if action == "keep" and not item.incoming:
            entry: dict[str, Any] = {"action": "keep", "file": item.file, "sha256": item.sha256}
        elif action in ("keep", "reject", "move", "unfamiliar"):
            if action == "move" and target_class not in self.classes:
                raise ReviewError("not_a_class", f"Move to one of: {', '.join(self.classes)}.")
            if not source.is_file():
                raise ReviewError("photo_gone", f"{item.file} is no longer in the data folder.")
            if action == "keep":  # accepting a correction: into the class the parent chose
                action, target_class = "accept", item.label if item.label in self.classes else None
            folder = self._folder_for(item, action, target_class)
            if folder == source.parent:
                raise ReviewError("same_folder", f"{item.file} is already in {folder.name}.")
            target = move_inside(self.roots, source, folder)
            entry = {"action": action, "from": item.file, "to": self.name_of(target), "sha256": item.sha256}
            if action in ("move", "accept"):
                entry["class"] = target_class or UNFAMILIAR_DIR
        else:
            raise ReviewError("bad_action", "The action is keep, reject, move or unfamiliar.")
        self._write(entry)
        self._mark(item, entry)
        item.file = entry.get("to", item.file)
        self.undo_stack.append({**entry, "id": item.id})
        return item

    def _folder_for(self, item: Item, action: str, target_class: str | None) -> Path:
        if action == "reject":
            if item.file.startswith(INCOMING) and self.incoming is not None:
                return self.incoming / REJECTED_DIR
            # Rejected photos go to _rejected/<the class folder they are in now>.
            current = Path(item.file).parts[0]
            return self.data / REJECTED_DIR / (current if current in self.classes else item.label)
        if action == "unfamiliar" or target_class is None:
            return self.data / UNFAMILIAR_DIR
        return self.data / target_class

    def undo(self) -> Item:
        """Take back the last decision: the photo goes back where it was (under another name if
        its old one has been taken since) and shows the decision it had before, if any."""
        if not self.undo_stack:
            raise ReviewError("nothing_to_undo", "There is nothing to undo.")
        entry = self.undo_stack[-1]
        item = self.items[entry["id"]]
        record: dict[str, Any] = {"action": "undo", "of": entry["action"], "file": item.file}
        if entry.get("to"):
            current = self.path_of(item.file)
            if not current.is_file():
                raise ReviewError("photo_gone", f"{item.file} is no longer in the data folder.")
            original = self.path_of(entry["from"])
            back = move_inside(self.roots, current, original.parent, original.name)
            item.file = self.name_of(back)
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
                "rejected": decisions.count("reject"), "accepted": decisions.count("accept"),
                "unfamiliar": decisions.count("unfamiliar"), "incoming": sum(item.incoming for item in self.items)}
