"""Tiny upstream applications for the lab, served by real application servers."""
