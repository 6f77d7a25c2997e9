"""Model definitions in plain PyTorch."""
