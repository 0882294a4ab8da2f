"""What else used the machine's CPU during a measurement, and which tandem code was measured."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_version() -> dict[str, str]:
    """Which tandem was measured: the commit, and a hash over uncommitted changes and untracked files (not bench/)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout

    digest = hashlib.sha1(git("diff", "HEAD", "--", ".", ":!bench").encode())
    for name in sorted(git("ls-files", "--others", "--exclude-standard", "--", ".", ":!bench").split()):
        try:
            digest.update(name.encode() + (ROOT / name).read_bytes())
        except OSError:  # removed meanwhile: others may be editing this tree
            digest.update(name.encode())
    return {"commit": git("rev-parse", "HEAD").strip(), "changes_sha1": digest.hexdigest()[:12]}


def busy_ticks() -> int:
    """All CPU time spent on the machine so far (user + nice + system + irq + softirq + steal), in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def own_ticks(root_pids: set[int]) -> int:
    """CPU time of the given processes and all their descendants (children of tandem's launcher included)."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, utime + stime)
    for entry in Path("/proc").iterdir():
        try:
            text = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if text:
            rest = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
            stats[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    ours, grew = set(root_pids), True
    while grew:
        more = {pid for pid, (parent, _) in stats.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    return sum(stats[pid][1] for pid in ours if pid in stats)
