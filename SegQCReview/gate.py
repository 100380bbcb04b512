"""One review per server process: a second browser is told the review is in use and sees no data.

trame shares one state between all clients and wslink publishes every state change and every
rendered view image to every connected websocket. So a second browser must never get a websocket
of this server while the first one holds it:

- the page itself (``/`` and ``/index.html``) answers a short "in use" page (HTTP 423) while a
  review client is connected, so a second browser does not even load the app;
- a websocket that opens while another is admitted (two pages loaded at the same moment, or a
  page kept from before) is closed at once, before it can ask for the state.

The first browser that connects owns the review until it disconnects; then the next one may.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("segqc.review")

IN_USE_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>SegQC Review: in use</title></head>
<body style="font-family: sans-serif; background: #121212; color: #eee; padding: 3em;">
<h2 id="segqc-in-use">This review is in use in another browser.</h2>
<p>SegQC Review serves one user per server process, so that nobody sees another user's images.
Start your own with <code>segqc review ...</code>, or reload this page once the other browser has closed it.</p>
</body></html>"""

WS_CLOSE_IN_USE = 4423  # websocket close code for a refused client (4000-4999: application codes)


class Gate:
    """Tracks the websocket that owns the review (``owner``) and refuses the others."""

    def __init__(self):
        self.owner: str | None = None
        self.refused = 0  # websockets closed because the review was in use (tests read it)

    # wslink handler hooks -------------------------------------------------------------------
    def wrap(self, handler) -> None:
        """Wrap ``handler``'s onConnect/onClose (an aiohttp wslink handler) with the gate."""
        onConnect, onClose = handler.onConnect, handler.onClose
        refusedIds = set()

        async def gatedConnect(request, client_id):
            if self.owner is not None and self.owner != client_id and self.owner in handler.connections:
                self.refused += 1
                refusedIds.add(client_id)
                log.warning("SegQC Review: refused a second client (the review is in use)")
                await handler.connections[client_id].close(code=WS_CLOSE_IN_USE, message=b"review in use")
                return
            self.owner = client_id
            await onConnect(request, client_id)

        async def gatedClose(client_id):
            if client_id in refusedIds:  # never admitted: the protocol knows nothing of it
                refusedIds.discard(client_id)
                return
            if self.owner == client_id:
                self.owner = None
            await onClose(client_id)

        handler.onConnect, handler.onClose = gatedConnect, gatedClose
        self._handler = handler

    def in_use(self) -> bool:
        handler = getattr(self, "_handler", None)
        return self.owner is not None and handler is not None and self.owner in handler.connections


def _index_html() -> Path:
    import trame_client

    return Path(trame_client.__file__).parent / "module" / "vue3-www" / "index.html"


def install(server) -> Gate:
    """Put the gate on ``server`` (a trame server, before ``start``); returns it."""
    from aiohttp import web

    gate = Gate()
    server.context.segqc_gate = gate

    async def page(request):
        if gate.in_use():
            return web.Response(text=IN_USE_HTML, content_type="text/html", status=423)
        if request.path == "/":
            raise web.HTTPFound("index.html" + (f"?{request.query_string}" if request.query_string else ""))
        return web.FileResponse(_index_html(), headers={"Cache-Control": "no-store"})

    def bind(wslink_server):
        # routes added here take precedence over wslink's static ones (trame_server.protocol)
        wslink_server.app.router.add_get("/", page)
        wslink_server.app.router.add_get("/index.html", page)
        for handler in getattr(wslink_server, "_ws_handlers", []):
            gate.wrap(handler)

    server.controller.on_server_bind.add(bind)
    return gate
