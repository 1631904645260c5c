"""Chat prompts as token ids, built turn by turn so every turn's prompt extends the last one.

Why ids and not a re-rendered template: a server that re-renders the whole conversation and
re-tokenizes it can split an earlier reply differently from how the model generated it, and
then the next turn's prefix no longer matches what was cached. Appending each turn's ids to the
history (the model's own reply ids included) keeps the prefix exact, which is what a prefix
cache needs and what engines that keep a session's tokens do.

Two formats: ChatML (``<|im_start|>role ... <|im_end|>``, SmolLM2 and most instruct models) and
the packaged pylm-6l's ``<|user|>``/``<|assistant|>`` markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from kvstore.errors import InvalidInputError


@dataclass(frozen=True)
class ChatFormat:
    tokenizer: Tokenizer
    chatml: bool

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> "ChatFormat":
        if tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
            return cls(tok, True)
        if tok.token_to_id("<|user|>") is not None and tok.token_to_id("<|assistant|>") is not None:
            return cls(tok, False)
        raise InvalidInputError("the tokenizer has no chat markers (neither ChatML's <|im_start|> nor <|user|>)")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def system(self, text: str) -> list[int]:
        """The conversation's opening: its system prompt."""
        if self.chatml:
            return self.encode(f"<|im_start|>system\n{text}<|im_end|>\n")
        return self.encode(text + "<|sep|>")

    def user(self, text: str, context: str = "") -> list[int]:
        """A user message and the start of the assistant's reply (the model continues from here).
        ``context`` (a retrieved document) opens the message and is tokenized on its own, so its
        ids are the same whatever question follows: prompts about one document share a prefix."""
        opening, contexts, closing = self.user_parts(text, [context] if context else [])
        return opening + [t for c in contexts for t in c] + closing

    def user_parts(self, text: str, contexts: list[str]) -> tuple[list[int], list[list[int]], list[int]]:
        """A user message in pieces, each tokenized on its own: its opening marker, each
        context (document), and the text with the start of the reply. CacheBlend reuses the
        documents' KV wherever they stand, so each must have the same ids in every prompt."""
        opening, closing = (("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n") if self.chatml
                            else ("<|user|>", "<|assistant|>"))
        if not contexts:
            return [], [], self.encode(opening + text + closing)
        return self.encode(opening), [self.encode(c) for c in contexts], self.encode(text + closing)

    @property
    def end_of_reply(self) -> int:
        """The token a finished reply ends with."""
        name = "<|im_end|>" if self.chatml else "<|sep|>"
        return self.tokenizer.token_to_id(name)

    def close_reply(self, reply: list[int]) -> list[int]:
        """What follows a generated reply in the history (its end marker if generation stopped
        before it, and the newline ChatML puts between turns)."""
        tail = [] if reply and reply[-1] == self.end_of_reply else [self.end_of_reply]
        return tail + (self.encode("\n") if self.chatml else [])
