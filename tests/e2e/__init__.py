"""End-to-end tests against a live server on the real engine."""
