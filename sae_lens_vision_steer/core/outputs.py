"""An output folder owned by one request (`vision-steer eval`, `sweep`, `run`).

`OUTPUTS_FILE` (`outputs.json`) records which command wrote the folder, the request it answered (the
settings that decide the numbers) and the files it wrote. A folder holding results of a different
request is refused, naming the differences, unless `overwrite=True` or every difference is in
`reevaluate_keys` (settings that change only the final numbers, e.g. `run`'s `lam`: the folder's
expensive parts are reused and the results rewritten; `OutputFolder.changed` says what changed); a
rerun of the same request (or an overwrite) removes the earlier run's files that the new run does not
write again (e.g. the `per_class_<method>.png` of a method no longer asked for). The folder is checked
for writability before any work, so finished results are never lost to a read-only or misspelt `--out`.
Under torchrun the ranks must agree on the folder first (rank 0 owns it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed
from .errors import ConflictError
from .fileio import check_writable_dir, write_json_atomic
from .requests import describe_differences, request_differences

OUTPUTS_FILE = "outputs.json"
# Files our commands write into an output folder; only these are ever removed.
_OWN_SUFFIXES = (".json", ".md", ".png")


def _describe(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return describe_differences(request_differences(found, wanted), "folder")


@dataclass
class OutputFolder:
    path: Path
    command: str
    request: dict[str, Any]
    previous_files: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # `reevaluate_keys` that differ from the folder's record

    def add(self, path: str | Path) -> Path:
        """Note a file written into the folder (kept in the record; not removed as stale)."""
        p = Path(path)
        self.written.append(p.name)  # every output sits directly in the folder
        return p

    def finish(self) -> list[str]:
        """Record the files of this run, then remove the earlier run's files it did not write again."""
        written = sorted(set(self.written))
        write_json_atomic(self.path / OUTPUTS_FILE, {"command": self.command, "request": self.request,
                                                     "files": written}, indent=2)
        stale = [f for f in self.previous_files if f not in written and f != OUTPUTS_FILE]
        for name in stale:
            p = self.path / name
            if p.is_file() and p.suffix in _OWN_SUFFIXES and p.parent == self.path:
                p.unlink()
        return stale


def prepare_output_dir(path: str | Path, command: str, request: dict[str, Any], overwrite: bool = False,
                       results_files: tuple[str, ...] = ("results.json", "sweep.json"),
                       reevaluate_keys: tuple[str, ...] = ()) -> OutputFolder:
    """Check that `path` can be written and that it holds no results of another request (differences only
    in `reevaluate_keys` are allowed: the results will be recomputed; they are in `changed`).

    Under torchrun every rank calls this before any work: the ranks must name the same folder (resolved;
    `RankMismatchError` on every rank otherwise), rank 0 checks it and every rank gets rank 0's answer."""
    distributed.same_folder(f"{command} output folder", path)
    return distributed.on_main(lambda: _prepare(path, command, request, overwrite, results_files, reevaluate_keys))


def _prepare(path: str | Path, command: str, request: dict[str, Any], overwrite: bool,
             results_files: tuple[str, ...], reevaluate_keys: tuple[str, ...] = ()) -> OutputFolder:
    request = json.loads(json.dumps(request, default=str))  # the form it takes on disk
    out = check_writable_dir(path)
    record_path = out / OUTPUTS_FILE
    previous: list[str] = []
    changed: list[str] = []
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            record = {"command": "?", "request": {"unreadable": str(record_path)}, "files": []}
        previous = [f for f in record.get("files", []) if isinstance(f, str) and "/" not in f]
        found_request = record.get("request") or {}
        diffs = _describe(found_request, request)
        if record.get("command") == command:
            changed = [d for d in diffs if d.split(":", 1)[0] in reevaluate_keys]
            diffs = [d for d in diffs if d not in changed]
        if record.get("command") != command:
            diffs.insert(0, f"command: folder has {record.get('command')!r}, request has {command!r}")
        if diffs and not overwrite:
            raise ConflictError(f"{out} holds results of a different request ({'; '.join(diffs[:6])}"
                                f"{'; ...' if len(diffs) > 6 else ''}). Give another --out, or --overwrite to "
                                "replace them")
    else:
        found = [name for name in results_files if (out / name).is_file()]
        if found and not overwrite:
            raise ConflictError(f"{out} holds earlier results ({', '.join(found)}) with no record of their request; "
                                "give another --out, or --overwrite to replace them")
        if found:
            previous = [p.name for p in out.iterdir()
                        if p.is_file() and (p.name in results_files or p.name == "results.md"
                                            or (p.name.startswith("per_class_") and p.suffix == ".png")
                                            or p.name == "sweep_heatmap.png")]
    return OutputFolder(out, command, request, previous, changed=[] if overwrite else changed)
