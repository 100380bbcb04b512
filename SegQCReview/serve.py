"""``segqc review``: open what the user named and serve the review on 127.0.0.1 (``--host`` to expose)."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def _kind(inputs: list[str]) -> str:
    if not inputs:
        return "none"
    first = Path(inputs[0])
    if first.is_dir() and (first / "results.csv").is_file():
        return "qc_dir"
    if first.suffix.lower() == ".mrb":
        return "scene"
    return "image"


def reachable_addresses(host: str) -> list[str]:
    """Who can reach a server bound to ``host``: ``127.0.0.1`` only this machine; ``0.0.0.0`` every
    address of this machine's interfaces (as far as Python can list them)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return []
    if host not in ("0.0.0.0", "::", ""):
        return [host]
    names = {socket.gethostname()}
    try:
        names.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    return sorted(names)


def serve(inputs: list[str], *, demo: bool = False, model: str | None = None, device: str = "auto",
          host: str = "127.0.0.1", port: int = 8080, out_dir: str | None = None, echo=print) -> None:
    """Build the app, open ``inputs`` (or the demo), print the URL and serve until interrupted.

    Raises :class:`SegQCLib.errors.InputError` naming the file when an input cannot be opened (the
    server is not started then).
    """
    # offscreen OpenGL without a display or GPU: EGL on Mesa's llvmpipe (OSMesa is not installed)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from .app import ReviewApp

    app = ReviewApp(model=model, device=device, out_dir=out_dir)
    kind = "demo" if demo else _kind(inputs)
    if kind == "demo":
        app.open_demo()
    elif kind == "qc_dir":
        app.open_qc_dir(inputs[0])
    elif kind == "scene":
        app.open_scene(inputs[0])
    elif kind == "image":
        app.open_image(inputs[0], inputs[1:])

    app.preload()  # the model's weights load while the browser connects

    def ready(**_):
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{app.server.port}/"
        echo(f"SegQC Review: {url}", flush=True)
        others = reachable_addresses(host)
        if others:
            echo(f"  --host {host}: anyone who can reach this machine on port {app.server.port} can open the review, "
                 f"e.g. http://{others[-1]}:{app.server.port}/ (addresses: {', '.join(others)}). "
                 "Anyone who connects first sees the images.", flush=True)

    app.server.controller.on_server_ready.add(ready)
    # timeout=0: no auto-shutdown when the browser disconnects (a reload must find the server)
    app.server.start(host=host, port=port, open_browser=False, timeout=0, show_connection_info=False)
