"""Engine tests: a package, so the engine fixture is torn down when they end."""
