"""Running a federation: the round as messages, backends that carry them, the run store, the runner."""
