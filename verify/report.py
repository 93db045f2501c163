"""What a verification run found: one Finding per check per file, and a Report that sums them up."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def first_few(problems: list[str], n: int = 5) -> str:
    """Up to n problems, then how many more: a detail line stays readable for a 93 GB file."""
    more = f"; and {len(problems) - n} more" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


@dataclass(frozen=True)
class Finding:
    check: str  # "pieces", "merkle", "checksum", "structure", "params"
    path: str  # relative to the verified folder
    ok: bool
    detail: str = ""
    refused: bool = False  # the file breaks its format's rules or is unsafe: bad input, not wrong data
    absent: bool = False  # listed but not here (a partial fetch): neither passed nor corrupt


@dataclass
class Report:
    root: str
    findings: list[Finding] = field(default_factory=list)

    def extend(self, findings) -> None:
        self.findings.extend(findings)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 all passed, 1 some data is wrong, 2 some input was refused (unsafe or not in its format)."""
        if any(f.refused for f in self.failures):
            return 2
        return 0 if self.ok else 1

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per check: how many files passed and failed."""
        out: dict[str, dict[str, int]] = {}
        for f in self.findings:
            c = out.setdefault(f.check, {"passed": 0, "failed": 0})
            kind = "absent" if f.absent else "passed" if f.ok else "failed"
            c[kind] = c.get(kind, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"root": self.root, "ok": self.ok, "exit_code": self.exit_code, "summary": self.summary(),
                "findings": [asdict(f) for f in self.findings]}
