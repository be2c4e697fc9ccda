"""Experiments: a grid of proxy x upstream idle timeouts, one trial per cell and repeat."""
