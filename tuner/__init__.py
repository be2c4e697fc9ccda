"""tuner: find and fix the keep-alive timeout mismatches behind intermittent 502s."""

__version__ = "0.1.0"
