"""Command-line front ends: psi-authority and the development PKI."""

__all__ = [
    "authority",
    "dev_pki",
    "help",
    "oversight",
]
