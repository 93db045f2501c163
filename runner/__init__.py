"""Model side: params.json config and synthetic releases (the model and converter come later)."""
from runner.config import ModelArgs, MoeArgs

__all__ = ["ModelArgs", "MoeArgs"]
