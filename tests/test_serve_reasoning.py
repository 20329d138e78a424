"""<think> splitting: any way a text is cut into stream pieces gives the same two strings."""

import itertools

import pytest

from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning


def feed_pieces(pieces, in_reasoning=False):
    s = ReasoningSplitter(in_reasoning)
    reasoning, content = "", ""
    for p in pieces:
        r, c = s.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = s.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("text,in_reasoning,want", [
    ("<think>Let me see.</think>The answer is 4.", False, ("Let me see.", "The answer is 4.")),
    ("no tags at all", False, (None, "no tags at all")),
    ("Let me see.</think>Done", True, ("Let me see.", "Done")),        # prompt opened the block
    ("still thinking when max_tokens hit", True, ("still thinking when max_tokens hit", "")),
    ("a < b and c <th", False, (None, "a < b and c <th")),             # a tag prefix at the end is text
    ("<think>x</thi", False, ("x</thi", "")),
    ("pre<think>r1</think>mid<think>r2</think>post", False, ("r1r2", "premidpost")),
])
def test_split_whole_text(text, in_reasoning, want):
    assert split_reasoning(text, in_reasoning) == want


def test_every_two_cut_split_gives_the_same_result():
    text = "<think>I should add 2+2.</think>It is <b>4</b>."
    want = split_reasoning(text)
    assert want == ("I should add 2+2.", "It is <b>4</b>.")
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert feed_pieces([text[:i], text[i:j], text[j:]]) == want, (i, j)


def test_one_character_pieces_never_leak_tag_fragments():
    text = "<think>hmm</think>ok"
    s = ReasoningSplitter()
    deltas = [s.feed(ch) for ch in text] + [s.flush()]
    assert all("<" not in r + c and ">" not in r + c for r, c in deltas)
    assert "".join(r for r, _ in deltas) == "hmm" and "".join(c for _, c in deltas) == "ok"


@pytest.mark.parametrize("tail,want", [
    ("<|Assistant|><think>\n", True),
    ("<|im_start|>assistant\n", False),
    ("<think>old</think>\n<|Assistant|>", False),
])
def test_prompt_opens_think(tail, want):
    assert prompt_opens_think(tail) is want
