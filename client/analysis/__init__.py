"""Pure parts of `starter.py analyze`: list a checkout's files, split them, merge the findings."""
