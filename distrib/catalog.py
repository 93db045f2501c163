"""The known torrent releases of open weights: magnets, files and the sums their publishers gave."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class ReleaseFile:
    path: str
    size: int | None  # bytes; None when the exact size is not known
    approx: bool = False  # size is the published approximation, not exact


@dataclass(frozen=True)
class Release:
    name: str  # what a user types: `weightswarm fetch mixtral-8x7b`
    title: str
    info_hash: str  # v1, hex
    torrent_name: str | None
    trackers: tuple[str, ...] = ()
    files: tuple[ReleaseFile, ...] = ()
    md5: tuple[tuple[str, str], ...] = ()  # (path in the torrent, md5 hex) as published
    notes: str = ""

    @property
    def magnet(self) -> str:
        parts = [f"xt=urn:btih:{self.info_hash}"]
        if self.torrent_name:
            parts.append(f"dn={quote(self.torrent_name)}")
        parts += [f"tr={quote(t, safe='')}" for t in self.trackers]
        return "magnet:?" + "&".join(parts)


RELEASES: tuple[Release, ...] = (
    Release(
        "mixtral-8x7b", "Mixtral 8x7B (Mistral AI, 2023-12-08)", "5546272da9065eddeb6fcd7ffddeef5b75be79a7",
        "mixtral-8x7b-32kseqlen",
        ("udp://opentracker.i2p.rocks:6969/announce", "http://tracker.openbittorrent.com:80/announce"),
        (ReleaseFile("consolidated.00.pth", 93_405_585_408, approx=True), ReleaseFile("params.json", 193),
         ReleaseFile("tokenizer.model", 493_000, approx=True), ReleaseFile("RELEASE", 10_600, approx=True)),
        (("consolidated.00.pth", "1faa9bc9b20fcfe81fcd4eb7166a79e6"),
         ("tokenizer.model", "37974873eb68a7ab30c4912fc36264ae")),
        "v1 torrent; 8 experts, 2 per token; bf16 torch.save checkpoint",
    ),
    Release(
        "mixtral-8x22b", "Mixtral 8x22B (Mistral AI, 2024-04-10)", "9238b09245d0d8cd915be09927769d5f7584c1c9",
        "mixtral-8x22b",
        ("udp://open.demonii.com:1337/announce", "http://tracker.opentrackr.org:1337/announce"),
        (ReleaseFile("consolidated.safetensors", 281_000_000_000, approx=True), ReleaseFile("params.json", None),
         ReleaseFile("tokenizer.model", None), ReleaseFile("RELEASE", None)),
        (),
        "md5 0535902c85ddbb04d4bebbf4371c6341 is published beside the magnet, without saying which file it covers",
    ),
    Release(
        "mistral-7b-v0.1", "Mistral 7B v0.1 (Mistral AI, 2023-09-27)", "208b101a0f51514ecf285885a8b0f6fb1a1e4d7d",
        None, notes="dense model; sliding_window 4096, RoPE theta 1e4",
    ),
    Release(
        "grok-1", "Grok-1 (xAI, 2024-03-17)", "5f96d43576e3d386c9ba65b883210a393b68210e", None,
        notes="ckpt-0/ of 770 pickled tensors; weightswarm never unpickles them without a restricted unpickler",
    ),
)

BY_NAME = {r.name: r for r in RELEASES}
BY_HASH = {r.info_hash: r for r in RELEASES}


def lookup(name: str) -> Release | None:
    return BY_NAME.get(name.lower())
