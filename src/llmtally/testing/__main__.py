"""``python -m llmtally.testing``: serve a fake provider until Ctrl-C (see :func:`main`)."""

from . import main

if __name__ == "__main__":
    main()
