"""Self-supervised losses, one small module each."""
