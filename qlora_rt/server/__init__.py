"""`qlora-rt serve`: an OpenAI-compatible HTTP server over an export, where each request picks its adapter.

    protocol.py    the request bodies (pydantic), the API's error shape
    adapters.py    the adapters this server has loaded: load, check, unload
    replies.py     the OpenAI reply shape, whole and streamed (server-sent events)
    routes.py      the endpoints, thin: parse, hand to the engine, reply
    state.py       what the routes share, typed (the export, its engine or classifier, its adapters)
    app.py         the app: error handlers, middlewares; `create_app`

Decoder requests go to the continuous-batching engine (runtime/batching.py), which runs in its own thread;
the event loop only parses, tokenizes (in a worker thread) and streams. Endpoints: docs/serving.md.
"""

from qlora_rt.server.app import create_app
from qlora_rt.server.state import State

__all__ = ["State", "create_app"]
