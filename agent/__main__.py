"""Run the machine entrypoint as `python3 -m agent [COMMAND...]`, exiting with its return code."""

import sys

from agent.entrypoint import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
