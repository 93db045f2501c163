"""Checkpoints rewritten: the per-expert layout with provenance (convert), the Hugging Face and Mistral
layouts from any layout (export), and synthetic releases for tests and benchmarks (synth)."""
