"""The sizes of synthetic releases: Mixtral 8x7B's shape (8 experts, 2 per token), dims scaled down."""
from __future__ import annotations

from weightswarm.core.errors import OptionError
from weightswarm.formats.params import ModelArgs, MoeArgs

# Small enough to train in a few hundredths of a second on the bundled corpus; the same for every preset.
VOCAB_SIZE = 1000

# Dimensions per preset; all keep Mixtral's 8 experts with 2 per token. Sizes are of the bf16 checkpoint.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2),  # ~1.1 MB
    "small": dict(dim=256, n_layers=4, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=2),  # ~27 MB
    "medium": dict(dim=512, n_layers=8, head_dim=64, hidden_dim=1280, n_heads=8, n_kv_heads=2),  # ~264 MB
    "1g": dict(dim=1024, n_layers=8, head_dim=64, hidden_dim=2560, n_heads=16, n_kv_heads=4),  # ~1.05 GB
    "4g": dict(dim=2048, n_layers=8, head_dim=128, hidden_dim=5120, n_heads=16, n_kv_heads=4),  # ~4.2 GB
}


def preset_args(preset: str, vocab_size: int = VOCAB_SIZE) -> ModelArgs:
    """The ModelArgs of a preset, shaped like Mixtral's params.json (no rope_theta, no sliding_window)."""
    if preset not in PRESETS:
        raise OptionError("--preset", preset, "unknown preset", hint=f"choose one of: {', '.join(PRESETS)}")
    return ModelArgs(**PRESETS[preset], norm_eps=1e-5, vocab_size=vocab_size,
                     moe=MoeArgs(num_experts=8, num_experts_per_tok=2))
