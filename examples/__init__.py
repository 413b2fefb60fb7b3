"""Runnable examples for eventbus; run them from the repository root.

``make example`` (which creates ``.venv``), then ``.venv/bin/python -m examples.order_service
demo``, is the place to start.
"""
