"""Causal Wan2.1 streaming pipeline (transformer, VAE, text encoder, loaders)."""
