"""Retrieval for the chat page of `lmlab serve --rag INDEX` (an lmlab extension, not part of OpenAI's API).

    GET  /v1/rag            the index: its embedding model and size (404 when the server has none)
    POST /v1/rag/context    {"question": "...", "messages": [earlier turns], "k": 4}
                            -> {"messages": [...], "sources": [{"n", "source", "start", "end", "score", "text"}]}

The page sends the returned messages (the retrieved chunks numbered [1]..[k] before the question, built by
lmlab.inference.retrieval.grounded_messages, as `lmlab rag ask` builds them) to /v1/chat/completions as any
conversation, and shows the sources under the answer. So retrieval adds one small request and changes nothing in
how answers are generated or streamed.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.inference.protocol import ApiError, number
from lmlab.inference.retrieval import Index, citations, grounded_messages

MAX_K = 16


class RagService:
    """An index and its embedding model, answering the page's retrieval requests."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = Index.load(folder)
        self.embedder = self.index.load_embedder()

    def info(self) -> dict:
        return {"index": self.folder.name, "chunks": len(self.index.chunks), "model": self.index.model["name"]}

    def context(self, body: dict) -> dict:
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "'question' must be a non-empty string", "question", "invalid_value")
        history = body.get("messages") or []
        if not isinstance(history, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    and m.get("role") in ("user", "assistant") for m in history):
            raise ApiError(400, "'messages' must be a list of {role: user|assistant, content: text}", "messages",
                           "invalid_value")
        k = number(body, "k", 4, 1, MAX_K, integer=True)
        try:
            hits = self.index.retrieve(self.embedder, question, k)  # hybrid, as `lmlab rag ask` retrieves
        except LmlabError as e:  # a question longer than the embedding model reads
            raise ApiError(400, str(e), "question", "context_length_exceeded") from None
        return {"messages": grounded_messages(question, hits, history), "sources": citations(hits)}
