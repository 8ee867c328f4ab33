"""Command-line front ends: psi-authority and the development PKI."""
