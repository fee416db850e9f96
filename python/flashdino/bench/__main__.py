"""``python -m flashdino.bench``: the same as ``flashdino bench``."""

from .e2e import main

if __name__ == "__main__":
    main()
