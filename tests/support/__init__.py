"""Helpers shared by the test packages (media written by real tools, file servers, ...)."""
