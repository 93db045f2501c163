"""What a verification run found: one Finding per check per file, and a Report that sums them up."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Finding:
    check: str  # "pieces", "merkle", "checksum", "structure", "params"
    path: str  # relative to the verified folder
    ok: bool
    detail: str = ""


@dataclass
class Report:
    root: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, path: str, ok: bool, detail: str = "") -> Finding:
        f = Finding(check, path, ok, detail)
        self.findings.append(f)
        return f

    def extend(self, findings) -> None:
        self.findings.extend(findings)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per check: how many files passed and failed."""
        out: dict[str, dict[str, int]] = {}
        for f in self.findings:
            c = out.setdefault(f.check, {"passed": 0, "failed": 0})
            c["passed" if f.ok else "failed"] += 1
        return out

    def to_json(self) -> dict:
        return {"root": self.root, "ok": self.ok, "summary": self.summary(),
                "findings": [asdict(f) for f in self.findings]}
