"""Prompt lookup (specserve.drafters.ngram.lookup): which earlier match drafts."""

from specserve.drafters.ngram import NgramDrafter, lookup


def test_a_repetition_drafts_a_whole_block_from_an_earlier_match_not_the_stub_behind_the_suffix():
    tokens = [7] + [1, 2, 3] * 4  # suffix 3 1 2 3 occurs at 3 and 6; the match at 6 is followed by 3 tokens only
    assert lookup(tokens, 4, 1, 4) == [1, 2, 3, 1]
    assert NgramDrafter().propose("s", tokens, 4).token_ids == [1, 2, 3, 1]
    assert lookup(tokens, 3, 1, 4) == [1, 2, 3], "the latest match is followed by the whole block of 3"


def test_the_latest_match_followed_by_k_tokens_drafts_over_earlier_ones():
    tokens = [5, 9, 1, 5, 8, 2, 2, 2, 2, 2, 5]  # 5 occurs at 0 and 3 before the suffix; both followed by 4+
    assert lookup(tokens, 4, 1, 4) == [8, 2, 2, 2]


def test_the_longest_suffix_match_wins_and_no_match_drafts_nothing():
    tokens = [4, 6, 1, 2, 9, 9, 3, 1, 2]  # 1 2 matches at 2 (n = 2); 2 alone would match there too
    assert lookup(tokens, 2, 1, 4) == [9, 9]
    assert lookup([1, 2, 3, 4], 4, 1, 4) == []
    assert lookup([1, 2, 3, 1], 4, 2, 4) == [], "a 1-token match is below ngram_min"
