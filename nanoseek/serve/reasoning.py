"""Split a reasoning model's `<think>...</think>` text from its answer.

Text inside the tags is returned as `reasoning_content`, the rest as `content`. Streaming
text arrives in arbitrary pieces, so a piece ending in a possible tag prefix ("...</thi") is
held back until the next piece decides it; `flush()` releases what is held when the
sample ends. Feeding a text in any split gives the same two strings as feeding it whole.
"""

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_think(prompt_tail: str) -> bool:
    """True when the prompt itself leaves a think block open (DeepSeek-R1 style templates end
    the generation prompt with "<think>\\n"), so the output starts inside the reasoning."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


class ReasoningSplitter:
    def __init__(self, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self.saw_reasoning = in_reasoning
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta) that are certain after this piece."""
        text, reasoning, content = self.held + piece, [], []
        while True:
            tag = CLOSE if self.in_reasoning else OPEN
            out = reasoning if self.in_reasoning else content
            at = text.find(tag)
            if at < 0:
                keep = _partial_tag_len(text, tag)
                out.append(text[:len(text) - keep])
                self.held = text[len(text) - keep:]
                return "".join(reasoning), "".join(content)
            out.append(text[:at])
            text = text[at + len(tag):]
            self.in_reasoning = not self.in_reasoning
            self.saw_reasoning = True

    def flush(self) -> tuple[str, str]:
        """The held-back text, which at the end of a sample can only be plain text."""
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", held)


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole text -> (reasoning or None when there was none, content)."""
    s = ReasoningSplitter(in_reasoning)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return (r1 + r2 if s.saw_reasoning else None), c1 + c2
