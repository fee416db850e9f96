"""``python -m flashdino ...``: the same command line as the ``flashdino`` script."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
