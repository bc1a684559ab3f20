"""Build the app for a loaded model and run it with uvicorn (in the foreground, or in a thread for tests and
benchmarks)."""
from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

__all__ = ["build_app", "ServerThread", "run_server", "eos_ids"]


def eos_ids(model, tokenizer, chat_cfg: dict) -> List[int]:
    """The ids that end a reply: the model config's eos_token_id and the tokenizer config's eos_token."""
    out = []
    e = getattr(getattr(model, "config", None), "eos_token_id", None)
    for v in (e if isinstance(e, (list, tuple)) else [e]):
        if isinstance(v, int) and 0 <= v < model.vocab_size:
            out.append(v)
    name = chat_cfg.get("eos_token")
    if name and hasattr(tokenizer, "token_to_id"):
        i = tokenizer.token_to_id(name)
        if i is not None and i not in out:
            out.append(int(i))
    return out


def build_app(model, tokenizer, model_name: str, *, model_dirs: Sequence[str] = (), max_batch: int = 64,
              max_queue: int = 256, prefill_chunk: int = 512, prefix_cache_mb: float = 1024.0,
              request_timeout: float = 600.0, max_tokens: int = 2048, max_prompt_tokens: int = 8192,
              api_key: Optional[str] = None, backend=None, prefill_budget: Optional[int] = None,
              decode: str = "auto"):
    """The FastAPI app serving ``model`` (any fastxlstm model, already on its device and dtype).

    model_dirs: where to look for chat_template.jinja / tokenizer_config.json (chat template, eos token);
    backend: a DecodeBackend; without one, ``decode`` picks it: "graph" (whole-pool decode steps as a CUDA graph,
    :class:`~fastxlstm.serve.backend.GraphBackend`), "eager", or "auto" (graph when the model can use it).
    The engine starts with the app (its lifespan).
    """
    from .app import create_app
    from .backend import EagerBackend, GraphBackend, graph_backend_available
    from .chat import ChatTemplate, load_chat_config
    from .scheduler import Engine

    cfg = load_chat_config(list(model_dirs))
    template = ChatTemplate(cfg["chat_template"], cfg["bos_token"], cfg["eos_token"])
    if backend is None:
        if decode not in ("auto", "eager", "graph"):
            raise ValueError(f"decode must be 'auto', 'eager' or 'graph', got {decode!r}")
        if decode == "graph" and not graph_backend_available(model):
            raise ValueError("decode='graph' needs the CUDA-graph decoder and a CUDA model (not float64)")
        use_graph = decode == "graph" or (decode == "auto" and graph_backend_available(model))
        backend = GraphBackend(model, max_batch) if use_graph else EagerBackend(model)
    engine = Engine(backend, max_batch=max_batch, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, prefix_cache_bytes=int(prefix_cache_mb * 2**20),
                    request_timeout=request_timeout, prefill_budget=prefill_budget)
    return create_app(engine, tokenizer, model_name, chat_template=template,
                      eos_token_ids=eos_ids(model, tokenizer, cfg), max_tokens=max_tokens,
                      max_prompt_tokens=max_prompt_tokens, api_key=api_key)


class ServerThread:
    """Run an app with uvicorn in a background thread: ``with ServerThread(app, port=0) as srv: srv.url``.

    port 0 picks a free port. ``stop()`` asks uvicorn to shut down (open streams are closed, the engine stops)
    and joins the thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket
        import uvicorn
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="fastxlstm-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started (port in use?)")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout} s")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve in the foreground until Ctrl-C."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
