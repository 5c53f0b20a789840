"""Multi-process (gloo, CPU) tests: a process runner, a reference model and a sharded-vs-unsharded parity harness."""
