"""``hilum audit verify``: check the MAC chain and say where it breaks."""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field

from node.audit.chain import GENESIS, ChainedLog, entry_mac, head_mac


@dataclass(frozen=True)
class Problem:
    line: int | None  # line of the log file (1-based); None for the head file
    seq: int | None  # the entry's sequence number, when readable
    what: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "head"
        if self.seq is not None:
            where += f" (entry {self.seq})"
        return f"{where}: {self.what}"


@dataclass
class Verdict:
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(log: ChainedLog) -> Verdict:
    lines = list(log.lines())
    parsed: list[tuple[int, dict | None]] = []
    for n, text in lines:
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        parsed.append((n, entry if isinstance(entry, dict) and isinstance(entry.get("seq"), int) else None))
    present = {e["seq"] for _, e in parsed if e is not None}

    macs = {e["seq"]: str(e.get("mac", "")) for _, e in parsed if e is not None}
    out = Verdict()
    expected, by_seq = 1, {}
    for n, entry in parsed:
        if entry is None:
            out.problems.append(Problem(n, None, "not a valid audit entry (edited, or a torn write)"))
            continue
        out.entries += 1
        seq = entry["seq"]
        by_seq[seq] = entry
        mac_ok = hmac.compare_digest(str(entry.get("mac", "")), entry_mac(log.key, entry))
        if not mac_ok:
            out.problems.append(Problem(n, seq, "entry modified: its MAC does not match its content"))
        if seq > expected:
            missing = [s for s in range(expected, seq) if s not in present]
            if missing:
                span = str(missing[0]) if len(missing) == 1 else f"{missing[0]}-{missing[-1]}"
                out.problems.append(Problem(n, seq, f"entry {span} missing before this line (removed)"))
            else:
                out.problems.append(Problem(n, seq, f"out of order: entry {expected} expected here (reordered)"))
        elif seq < expected:
            out.problems.append(Problem(n, seq, f"out of order: follows entry {expected - 1} (reordered or duplicated)"))
        elif mac_ok and entry.get("prev") != (GENESIS if seq == 1 else macs.get(seq - 1, entry.get("prev"))):
            out.problems.append(Problem(n, seq, "chain broken: does not follow the previous entry (replaced)"))
        expected = max(expected, seq + 1)
    _check_head(log, out, max(present, default=0), by_seq)
    return out


def _check_head(log: ChainedLog, out: Verdict, last: int, by_seq: dict[int, dict]) -> None:
    head = log.head()
    if head is None:
        if last:
            out.problems.append(Problem(None, None, "head file missing: removal of the last entries cannot be ruled out"))
        elif log.marker is not None and log.marker.exists():
            out.problems.append(Problem(None, None, f"the log and its head file are gone, although its key wrote "
                                                    f"to them before ({log.marker})"))
        return
    seq, mac = head.get("seq"), head.get("mac")
    if not isinstance(seq, int) or not isinstance(mac, str) or not hmac.compare_digest(
            str(head.get("head_mac", "")), head_mac(log.key, seq, mac)):
        out.problems.append(Problem(None, None, "head file modified: its MAC does not match"))
        return
    if seq > last:
        span = str(seq) if seq == last + 1 else f"{last + 1}-{seq}"
        out.problems.append(Problem(None, seq, f"entry {span} missing at the end of the log (removed)"))
    elif seq in by_seq and by_seq[seq].get("mac") != mac:
        out.problems.append(Problem(None, seq, "entry differs from the one recorded when it was written (replaced)"))
