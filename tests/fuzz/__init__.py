"""Protocol fuzzing: hostile messages against the parser, the state machine and a live server."""
