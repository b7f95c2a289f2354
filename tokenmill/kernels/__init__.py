"""Native kernels, compiled on first use; every one has a plain-PyTorch fallback."""
