import pytest

from lib.prompts import PromptError, check_length, subject_positions
from lib.tokenizer import build_clip_tokenizer

TOK = build_clip_tokenizer()


def test_long_prompt_is_an_error_unless_truncation_is_asked():
    long = "a photo of a cat " * 30
    with pytest.raises(PromptError, match=r"tokens .*; shorten it$"):  # a tracing or editing caller cannot truncate
        check_length(TOK, long)
    check_length(TOK, long, truncate=True)
    check_length(TOK, ["a photo of a cat"])
    at_limit = " ".join(["cat"] * 75)  # 75 words + start + end = 77 tokens: fits; one more does not
    check_length(TOK, at_limit)
    with pytest.raises(PromptError, match="has 78 tokens"):
        check_length(TOK, at_limit + " cat")


def test_subject_positions_and_errors():
    assert subject_positions(TOK, "a painting in the style of van gogh", "van gogh") == [7, 8]
    with pytest.raises(PromptError, match="monet.*not found.*van gogh"):
        subject_positions(TOK, "a painting in the style of van gogh", "monet")
    with pytest.raises(PromptError, match=r"subject 'cat' is named 2 times in caption 'a cat next to a cat' \(at token "
                                          r"positions \[\[2\], \[6\]\]\); name it once"):
        subject_positions(TOK, "a cat next to a cat", "cat")
    assert subject_positions(TOK, "a cat next to a catfish", "cat") == [2]  # "catfish" is a token of its own


def test_subject_tokenised_differently_in_the_caption():
    """``car`` is a token of its own, but ``carpet`` is one token: not found, and the error names both tokenisations."""
    with pytest.raises(PromptError, match=r"subject 'car' \(tokens \['car</w>'\]\) not found in caption "
                                          r"'a photo of a carpet' \(tokens \[.*'carpet</w>'"):
        subject_positions(TOK, "a photo of a carpet", "car")


def test_a_subject_beyond_the_context_is_refused():
    tok = build_clip_tokenizer()
    caption = "a photo of " + "very " * 80 + "snoopy"  # snoopy's tokens lie past the 77-token context
    with pytest.raises(PromptError, match="beyond the 77-token context"):
        subject_positions(tok, caption, "snoopy")
    words = ["very"] * 74
    assert subject_positions(tok, " ".join(words + ["cat"]), "cat") == [75]  # the last position before the end token
    with pytest.raises(PromptError, match="beyond the 77-token context"):  # position 76: the end token's place
        subject_positions(tok, " ".join(words + ["very", "cat"]), "cat")


def test_only_encode_suggests_truncation_which_only_it_offers():
    from lib.sampling import encode
    from lib.twins import build_twin

    with pytest.raises(PromptError, match=r"; shorten it or pass truncate=True$"):
        encode(build_twin("sd-v1"), "a photo of a cat " * 30)
