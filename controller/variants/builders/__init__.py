"""One module per variant kind. Each imports its heavy libraries inside `build`, so importing the
pipeline (or the CLI) stays fast and a missing library fails only its own builder."""
