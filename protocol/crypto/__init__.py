"""Hazmat layer: RFC 9497 OPRF, KKRT OT-extension primitives, fast Paillier, encoding."""
