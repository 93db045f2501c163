"""weightswarm: fetch, verify, convert and seed open model weights released over BitTorrent."""
from weightswarm.errors import (FormatError, InputError, SwarmError, TorrentError, VerificationError,
                                WeightswarmError)

__version__ = "0.1.0"
__all__ = ["WeightswarmError", "InputError", "TorrentError", "FormatError", "SwarmError", "VerificationError"]
