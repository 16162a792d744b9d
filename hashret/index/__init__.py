"""Codes on disk and the Hamming scan."""
