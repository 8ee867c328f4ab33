"""Match engines behind one interface, and their registry."""
