"""The OpenWebText cleaning pipeline: URL blacklist, cleanup, near-duplicate removal, merge.

Each step is a script run from the repository root (``python openwebtext/STEP.py --help``);
``openwebtext/README.md`` walks through them in order, and ``openwebtext/common.py`` holds what they share.
"""
