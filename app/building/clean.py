"""Clean a folder of labelled photos the lesson's way: review what looks mislabeled or out of place.

    python -m app.clean DATA [--incoming FEEDBACK_DIR] [--report FILE.csv] [--host 127.0.0.1] [--port 8001]

DATA holds one sub-folder of photos per class, as for `app.train`. Every photo is ranked out of
sample (`app.building.ranking`). Then a local review page (`app.building.review_app`) shows the most
suspicious photos first, with Keep, Reject (moved to DATA/_rejected/CLASS/, never deleted) and Move
to another class; every decision is appended to DATA/.clean-log.jsonl, so a restarted review
resumes. `--report FILE.csv` writes the ranking instead of serving the page.

`--incoming FEEDBACK_DIR` shows the corrections sent from the service's page first (README,
"Improve it from use"), each with the parent's label and the model's answer: accept it into
DATA/<label>, move it to another class, put it in DATA/_unfamiliar/ (none of the classes: give that
folder to `--unfamiliar`), or reject it to FEEDBACK_DIR/_rejected/. Afterwards,
`python -m app.train DATA` retrains.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from app.building.cli import UsageError, add_threads, parser, run_command
from app.building.datasets import REJECTED_DIR
from app.building.ranking import OUTLIER_Z, cache_path, score_folder, write_report
from app.building.review_app import bind, serve
from app.core.feedback import read_corrections
from app.core.files import writable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m app.clean", __doc__)
    p.add_argument("data", type=Path, help="folder with one sub-folder of photos per class")
    p.add_argument("--incoming", type=Path, metavar="FEEDBACK_DIR",
                   help="review the corrections the service kept in FEEDBACK_DIR first")
    p.add_argument("--report", type=Path, metavar="FILE.csv", help="write the ranking to FILE.csv and exit")
    p.add_argument("--host", default="127.0.0.1", help="address of the review page")
    p.add_argument("--port", type=int, default=8001, help="port of the review page")
    add_threads(p, "computing features")
    return p.parse_args(argv)


def check_writable(data: Path, incoming: Path | None) -> None:
    folders = [data, *(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))]
    if incoming is not None:
        folders.append(incoming)
    locked = [str(p) for p in folders if not os.access(p, os.W_OK | os.X_OK)]
    if locked or not writable(data / REJECTED_DIR):
        raise UsageError(f"{locked[0] if locked else data / REJECTED_DIR} is read-only: the review moves photos; "
                         "use --report FILE.csv to only write the ranking")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        if not args.data.is_dir():
            raise UsageError(f"data folder not found: {args.data}")
        if args.incoming is not None and args.report is not None:
            raise UsageError("--incoming is reviewed on the page: leave out --report")
        if args.incoming is not None and not args.incoming.is_dir():
            raise UsageError(f"feedback folder not found: {args.incoming} (the server's FEEDBACK_DIR)")
        # The page's port is taken before minutes of scoring, so a busy one is said at once.
        sock = None if args.report is not None else bind(args.host, args.port)
        if args.report is None:
            check_writable(args.data, args.incoming)
        ranking = score_folder(args.data, args.threads)
        suspicious = sum(s.label_issue or s.outlier >= OUTLIER_Z for s in ranking.suspects)
        print(f"{len(ranking.suspects)} photos scored, {suspicious} look mislabeled or out of place, "
              f"{len(ranking.undecodable)} do not decode (features cached in {cache_path()})", flush=True)
        if sock is None:
            write_report(ranking, args.report)
            print(f"ranking written to {args.report}")
            return 0
        if args.incoming is not None:
            print(f"{len(read_corrections(args.incoming))} corrections sent from the page wait in {args.incoming}; "
                  "they come first", flush=True)
        return serve(args.data, ranking, sock, args.incoming)

    return run_command(run)
