"""Domain layer: records, validation, normalization, match rules, protocol messages."""
