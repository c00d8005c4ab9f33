"""Serving a trained GPT2 model over HTTP (``tools/serve.py``): request checks (``api``), continuous
batching over the key/value cache (``engine``), the aiohttp server (``server``) and its page."""
