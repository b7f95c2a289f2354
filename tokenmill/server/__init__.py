"""The OpenAI-compatible HTTP server: a FastAPI frontend in front of an engine core in its own process.

`tokenmill serve` (tokenmill.entrypoints.server_cli) -> launcher.run_server -> app.build_app + frontend.Frontend,
which drives the engine through engine_client (ZMQ + msgpack, protocol.py) or a thread (--inproc).
"""
