"""Load generation through the lab's proxy."""
