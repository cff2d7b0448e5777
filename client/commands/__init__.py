"""The starter's commands, one module per group; `starter.py` parses arguments and picks one."""
