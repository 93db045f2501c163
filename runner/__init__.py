"""The model proper: Mixtral in plain PyTorch (model), assembled from any checkpoint layout without copying
its weights (load), text generation with a KV cache (generate), and the smoke test (smoke)."""
