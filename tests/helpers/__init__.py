"""Helper programs that tests run as real subprocesses."""
